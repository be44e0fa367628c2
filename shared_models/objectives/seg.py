"""G2D's pseudo segmentation: a decoder over the feature pyramid predicts masks cut from the attention pool."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.registry import register_objective


@torch.no_grad()
def pseudo_masks(
    attention: Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int], quantile: float = 0.85
) -> Tensor:
    """Binary masks [B, 1, H, W] marking each image's top (1 - quantile) of upsampled attention.

    attention: the attention pool's query->grid weights, [B, h*w] or [B, heads, h*w] (heads are averaged).
    Each image keeps its own round((1 - quantile) * H * W) highest pixels, i.e. those above its own
    quantile; bilinear upsampling repeats values at the borders, so ties are broken by position to keep
    the count exact. Targets, so no gradient.
    """
    if attention.dim() == 3:
        attention = attention.mean(dim=1)
    height, width = grid_hw
    if attention.dim() != 2 or attention.shape[1] != height * width:
        raise ValueError(f"attention must be [B, {height * width}] or [B, heads, {height * width}] for grid {grid_hw}, "
                         f"got {tuple(attention.shape)}")
    batch = attention.shape[0]
    maps = attention.detach().float().reshape(batch, 1, height, width)
    maps = F.interpolate(maps, size=tuple(image_hw), mode="bilinear", align_corners=False).flatten(1)
    keep = round((1 - quantile) * maps.shape[1])
    masks = torch.zeros_like(maps).scatter(1, maps.topk(keep, dim=1).indices, 1.0)  # out of place: vmap batches it
    return masks.reshape(batch, 1, *image_hw)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, GroupNorm (DP-compatible, unlike BatchNorm), ReLU; twice."""
    groups = math.gcd(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(),
    )


class SegmentationDecoder(nn.Module):
    """U-Net-style decoder: from the coarsest level up, upsample, concatenate the next finer level, convolve.

    pyramid_channels and the pyramid are given FINEST FIRST (timm `features_only` order). Widths halve
    towards finer levels, from `width` at the coarsest down to at least 16. Returns one-channel logits
    at `out_size` (or the finest level's size when no size is given).
    """

    def __init__(self, pyramid_channels: list[int], out_size: tuple[int, int] | None = None, width: int = 128):
        super().__init__()
        if not pyramid_channels:
            raise ValueError("pyramid_channels is empty: the segmentation decoder needs at least one feature level")
        self.out_size = tuple(out_size) if out_size is not None else None
        coarse_to_fine = list(pyramid_channels)[::-1]
        widths = [max(16, width >> level) for level in range(len(coarse_to_fine))]
        self.stem = conv_block(coarse_to_fine[0], widths[0])
        self.blocks = nn.ModuleList(
            conv_block(widths[i - 1] + coarse_to_fine[i], widths[i]) for i in range(1, len(coarse_to_fine))
        )
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, pyramid: list[Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        if len(pyramid) != len(self.blocks) + 1:
            raise ValueError(f"expected {len(self.blocks) + 1} pyramid levels (finest first), got {len(pyramid)}")
        levels = pyramid[::-1]
        x = self.stem(levels[0])
        for block, skip in zip(self.blocks, levels[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        size = out_size or self.out_size
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


def dice_bce_loss(logits: Tensor, target: Tensor, bce_weight: float = 0.2, smooth: float = 1e-6) -> Tensor:
    """Soft Dice on sigmoid probabilities (per image, averaged) + bce_weight * BCE on the logits.

    G2D's released code takes Dice on raw logits, which is unbounded and not a Dice at all.
    """
    probs = logits.sigmoid()
    dims = tuple(range(1, logits.dim()))
    overlap = (probs * target).sum(dims)
    dice = 1 - (2 * overlap + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return dice.mean() + bce_weight * F.binary_cross_entropy_with_logits(logits, target)


class PseudoSegmentation(nn.Module):
    """G2D's dense objective: predict the attention-derived pseudo masks from the feature pyramid."""

    def __init__(self, pyramid_channels: list[int], quantile: float = 0.85, bce_weight: float = 0.2, width: int = 128):
        super().__init__()
        self.decoder = SegmentationDecoder(pyramid_channels, width=width)
        self.quantile = quantile
        self.bce_weight = bce_weight

    def forward(
        self, pyramid: list[Tensor], attention: Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int]
    ) -> Tensor:
        target = pseudo_masks(attention, grid_hw, image_hw, self.quantile)
        logits = self.decoder(pyramid, out_size=image_hw)
        return dice_bce_loss(logits.float(), target, self.bce_weight)


@register_objective("seg", build=lambda c, m: PseudoSegmentation(m.image_encoder.pyramid_channels, c["quantile"],
                                                                 c["bce_weight"], c["width"]),
                    inputs=("image",), batch=("images",), starts={"seg": "seg_start"})
def seg_loss(model, s, step: int) -> dict[str, Tensor]:
    """G2D's pseudo segmentation, after the warm-up."""
    image_hw = tuple(s.batch["images"].shape[-2:])
    return {"seg": model.objectives["seg"](s.image.pyramid, s.image.pool_attention, s.image.grid_hw, image_hw)}
