"""Image encoder: any timm backbone -> global embedding, patch tokens, feature pyramid and attention maps."""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageFeatures:
    global_emb: torch.Tensor        # [B, D]
    patch_tokens: torch.Tensor      # [B, N, D], N = h * w, row-major over grid_hw
    grid_hw: tuple[int, int]        # (h, w) of the patch grid
    pyramid: list[torch.Tensor]     # [B, C_i, H_i, W_i], fine to coarse
    patch_weights: torch.Tensor     # [B, N] head-averaged attention of the global query to each patch
    pool_attention: torch.Tensor    # [B, heads, N] the same attention per head (G2D pseudo masks)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling of a feature map, queried by the map's mean token."""

    def __init__(self, grid_hw: tuple[int, int], dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention pool: feature dim {dim} is not divisible by pool_heads={num_heads}")
        self.grid_hw = tuple(grid_hw)
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(grid_hw[0] * grid_hw[1] + 1, dim) / dim**0.5)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim or dim)

    def _positions(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        if tuple(grid_hw) == self.grid_hw:
            return self.positional_embedding
        # Other input sizes: resample the grid part of the positional embedding.
        mean_pos, grid_pos = self.positional_embedding[:1], self.positional_embedding[1:]
        grid_pos = grid_pos.T.reshape(1, -1, *self.grid_hw)
        grid_pos = F.interpolate(grid_pos, size=grid_hw, mode="bilinear", align_corners=False)
        return torch.cat([mean_pos, grid_pos.flatten(2)[0].T], dim=0)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feature_map [B, C, h, w] -> (pooled [B, output_dim], attention of the query to the grid [B, heads, h*w])."""
        b, c, h, w = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)                    # [B, N, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], 1)   # mean token first
        tokens = tokens + self._positions((h, w)).to(tokens.dtype)
        head_dim = c // self.num_heads
        q = self.q_proj(tokens[:, :1]).reshape(b, 1, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(tokens).reshape(b, -1, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(tokens).reshape(b, -1, self.num_heads, head_dim).transpose(1, 2)
        attention = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)   # [B, heads, 1, 1+N]
        pooled = (attention @ v).transpose(1, 2).reshape(b, c)
        return self.c_proj(pooled), attention[:, :, 0, 1:]


def _without_inplace_activations(model: nn.Module) -> None:
    # In-place activations break per-sample gradient hooks (Opacus) and backward hooks in general.
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False


class ImageEncoder(nn.Module):
    """Wraps `timm.create_model(timm_name, **timm_kwargs)`; input is [B, 1, H, W] in [0, 1].

    `pretrained`: False (random init), True (timm's default weights, from the local hub or torch cache
    only) or the path of a weights file (.safetensors, or a timm / torch checkpoint .pth / .bin / .pt):
    timm adapts an RGB stem to one channel and drops the classifier; a parameter whose shape differs
    is refused by name. Nothing is ever downloaded.
    """

    def __init__(
        self,
        timm_name: str,
        img_size: int = 224,
        pretrained: bool | str = False,
        norm: str = "batch",
        pool_heads: int = 8,
        pyramid_levels: int = 4,
        kwargs: dict | None = None,
        global_pool: str = "token",
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"image encoder global_pool must be 'token' or 'avg', got {global_pool!r}")
        # Transformers only: the class token (as pretrained ViTs are read) or the mean patch token, which
        # depends on the image from the first step and so trains faster from scratch.
        self.global_pool = global_pool
        if norm not in ("batch", "group"):
            raise ValueError(f"image encoder norm must be 'batch' or 'group', got {norm!r}")
        self.timm_name = timm_name
        self.img_size = img_size
        timm_kwargs = {"num_classes": 0, "in_chans": 1, **(kwargs or {})}
        pretrained = local_weights(timm_name, pretrained)
        self.model, self.timm_kwargs = _create_timm(timm_name, pretrained, img_size, timm_kwargs)
        if norm == "group" and _has_batch_norm(self.model):
            # Rebuilt through timm's own kwarg rather than swapped module by module, so that export's
            # `timm.create_model(name, **kwargs)` gives the identical architecture.
            timm_kwargs["norm_layer"] = "groupnorm"
            try:
                self.model, self.timm_kwargs = _create_timm(timm_name, pretrained, img_size, timm_kwargs)
            except ValueError as error:
                if "num_groups" not in str(error):
                    raise
                raise ValueError(f"{timm_name} with kwargs {kwargs or {}} has a layer that GroupNorm's 32 groups cannot "
                                 f"divide ({error}); norm=group (DP-SGD) needs a model whose every layer has a multiple "
                                 "of 32 channels, e.g. model=tiny_cnn") from None
            if _has_batch_norm(self.model):
                raise ValueError(f"{timm_name} keeps BatchNorm with norm_layer='groupnorm'; use norm=batch for it")
        _without_inplace_activations(self.model)

        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        self.is_transformer = hasattr(self.model, "blocks")
        if self.is_transformer and self.num_prefix_tokens == 0:
            raise ValueError(
                f"{timm_name}: transformer encoders need a class token (its attention weights the patches)"
            )
        self.pyramid_indices, self.pyramid_channels = self._pyramid_layout(pyramid_levels)
        self.feature_dim = self.model.num_features
        self.attention_pool = None
        # The last block's input by thread: the DP loop runs studies' forwards on several threads at once, and one
        # attribute would hand a study another study's tokens (its gradient then depends on that other patient).
        self._last_block_inputs: dict[int, torch.Tensor] = {}
        if self.is_transformer:
            self.model.blocks[-1].attn.register_forward_pre_hook(self._keep_last_block_input)
        else:
            reduction = self.model.feature_info[-1]["reduction"]
            grid = (img_size // reduction, img_size // reduction)
            self.attention_pool = AttentionPool2d(grid, self.feature_dim, pool_heads)
            # Convolution weights held channels_last: oneDNN's fast layout on CPU (make bench: resnet50's forward
            # 0.72 -> 0.87 of a large matmul's FLOP/s; tiny_cnn_half's step 9 % faster). The values are the same;
            # whatever writes them out makes them contiguous (checkpoints, the wire, export).
            self.model.to(memory_format=torch.channels_last)

    def _pyramid_layout(self, levels: int) -> tuple[list[int], list[int]]:
        if self.is_transformer:
            depth = len(self.model.blocks)
            indices = sorted({round(depth - 1 - i * depth / levels) for i in range(levels)})
            return indices, [self.model.embed_dim] * len(indices)
        info = self.model.feature_info[-levels:]
        first = len(self.model.feature_info) - len(info)
        return list(range(first, len(self.model.feature_info))), [i["num_chs"] for i in info]

    def _keep_last_block_input(self, module: nn.Module, args: tuple) -> None:
        self._last_block_inputs[threading.get_ident()] = args[0]

    def _cls_attention(self) -> torch.Tensor:
        """Recompute the last block's attention of the class token to the patches (this thread's forward): [B, heads, N]."""
        attn, x = self.model.blocks[-1].attn, self._last_block_inputs.pop(threading.get_ident())
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
        return weights[:, :, 0, self.num_prefix_tokens:]

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
        x = (images - 0.5) / 0.5
        final, pyramid = self.model.forward_intermediates(x, indices=self.pyramid_indices, output_fmt="NCHW")
        if self.is_transformer:
            grid_hw = tuple(pyramid[-1].shape[-2:])
            patch_tokens = final[:, self.num_prefix_tokens:]
            global_emb = final[:, 0] if self.global_pool == "token" else patch_tokens.mean(dim=1)
            attention = self._cls_attention()
        else:
            grid_hw = tuple(final.shape[-2:])
            global_emb, attention = self.attention_pool(final)
            patch_tokens = final.flatten(2).transpose(1, 2)
        return ImageFeatures(
            global_emb=global_emb,
            patch_tokens=patch_tokens,
            grid_hw=grid_hw,
            pyramid=list(pyramid),
            patch_weights=attention.mean(dim=1),
            pool_attention=attention,
        )


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def local_weights(name: str, pretrained: bool | str | os.PathLike | None) -> Path | None:
    """The weights file `pretrained` names: None for random init, the file for a path, and for True
    timm's default weights for `name` where the hub or torch cache already holds them."""
    if not pretrained:
        return None
    if pretrained is True:
        return _cached_default_weights(name)
    path = Path(os.fspath(pretrained)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.image.pretrained={os.fspath(pretrained)!r}: no such file; give the path "
                                f"of a weights file ({', '.join(WEIGHT_SUFFIXES)}), true or false")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"model.image.pretrained={str(path)!r}: not a weights file name; expected one ending in "
                         f"{', '.join(WEIGHT_SUFFIXES)}")
    return path.resolve()


def _cached_default_weights(name: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    candidates = []
    if cfg is not None and cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename:
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                candidates.append(Path(found) if isinstance(found, str) else None)
    if cfg is not None and cfg.url:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url))
    for path in candidates:
        if path is not None and path.is_file():
            return path
    hub_id = cfg.hf_hub_id if cfg is not None else None
    raise FileNotFoundError(
        f"model.image.pretrained=true: timm's weights for {name!r} are not in this machine's cache, and nothing is "
        f"downloaded here. Stage them on a connected machine ("
        + (f"huggingface-cli download {hub_id} model.safetensors" if hub_id else "save the model's state_dict")
        + ") and set model.image.pretrained to the file's path (docs/simulation.md, 'Pretrained weights offline')")


def _create_timm(name: str, weights: Path | None, img_size: int, kwargs: dict) -> tuple[nn.Module, dict]:
    """Create the timm model, passing img_size only to families that take it; returns the kwargs used."""
    try:
        kwargs_with_size = {**kwargs, "img_size": img_size}
        return _timm_model(name, weights, kwargs_with_size), kwargs_with_size
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return _timm_model(name, weights, kwargs), dict(kwargs)


def _timm_model(name: str, weights: Path | None, kwargs: dict) -> nn.Module:
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    # timm's own file loading: its checkpoint filter (position embeddings resampled to img_size), the
    # RGB stem summed to one channel, the classifier dropped for num_classes=0; `file` keeps it off any hub.
    overlay = {"file": str(weights), "source": "", "hf_hub_id": None, "url": ""}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        why = _shape_mismatch(name, weights, kwargs) or _first_mismatch(str(error))
        raise ValueError(f"model.image.pretrained={str(weights)!r} does not fit {name} ({kwargs}): {why}") from None
    # Some families load non-strictly: a parameter the file lacks would stay at random init, silently.
    in_file = set(timm.models.load_state_dict(str(weights)))
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - in_file)
    if missing and len(in_file & expected) >= len(in_file) / 2:   # (a file in another key format is remapped by timm)
        raise ValueError(f"model.image.pretrained={str(weights)!r} does not fit {name} ({kwargs}): "
                         f"{_first_mismatch('Missing key(s) in state_dict: ' + ', '.join(missing))}")
    return model


def _shape_mismatch(name: str, weights: Path, kwargs: dict) -> str | None:
    """The first parameter whose shape differs between the file and the model (the stem's input channels,
    which timm adapts, aside)."""
    model = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    stem = f"{model_first_conv(name)}.weight"
    for key, value in timm.models.load_state_dict(str(weights)).items():
        if key in model and tuple(value.shape) != tuple(model[key].shape):
            if key == stem and value.shape[:1] + value.shape[2:] == model[key].shape[:1] + model[key].shape[2:]:
                continue
            return f"parameter {key} has shape {list(value.shape)} in the file, {list(model[key].shape)} in the model"
    return None


def model_first_conv(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    first = cfg.first_conv if cfg is not None else None
    return first if isinstance(first, str) else None


def _first_mismatch(message: str) -> str:
    """The first offending parameter in torch's load_state_dict error, in words."""
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
                     r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", message)
    if size:
        return f"parameter {size.group(1)} has shape {size.group(2)[11:-1]} in the file, {size.group(3)[11:-1]} in the model"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ([^\n]*)", message)
    if keys:
        names = [k.strip(' "') for k in keys.group(2).split(",")]
        what = "missing from the file" if keys.group(1) == "Missing" else "in the file but not in the model"
        return f"{len(names)} parameter(s) {what}, e.g. {', '.join(names[:3])}"
    return message.splitlines()[0][:300]
