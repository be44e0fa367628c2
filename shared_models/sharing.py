"""Which entries of the model's state are shared parameters (sent each round) and which stay at the site."""
from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

# Encoders and projection heads are shared; decoders, tag decoder and queries, pseudo-seg head stay local.
DEFAULT_SHARED = ("image_encoder.*", "text_encoder.*", "*_projection.*")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_state_names(model: nn.Module) -> set[str]:
    """State names (parameters and buffers) that belong to normalisation layers (FedBN keeps them local)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            names.update(f"{module_name}.{key}" for key in module.state_dict())
    return names


def shared_parameter_names(
    model: nn.Module, patterns: tuple[str, ...] | list[str] = DEFAULT_SHARED, local: tuple[str, ...] | list[str] = (),
    fedbn: bool = False,
) -> list[str]:
    """State names matching any `patterns` and no `local` pattern (fnmatch); under `fedbn`, norm layers excluded."""
    excluded = norm_state_names(model) if fedbn else set()
    return [
        name
        for name in model.state_dict()
        if any(fnmatch(name, p) for p in patterns) and not any(fnmatch(name, p) for p in local) and name not in excluded
    ]


def sharing_settings(cfg) -> dict:
    """`model.sharing` of the composed config ({shared, local, fedbn}), defaults where absent."""
    model_cfg = cfg.get("model") if cfg is not None else None
    sharing = (model_cfg.get("sharing") if model_cfg is not None else None) or {}
    return {
        "patterns": tuple(sharing.get("shared") or DEFAULT_SHARED),
        "local": tuple(sharing.get("local") or ()),
        "fedbn": bool(sharing.get("fedbn", False)),
    }


def split_state(model: nn.Module, cfg=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local_only) views of `model.state_dict()` by the configured sharing patterns."""
    state = model.state_dict()
    shared_names = set(shared_parameter_names(model, **sharing_settings(cfg)))
    shared = {name: value for name, value in state.items() if name in shared_names}
    local_only = {name: value for name, value in state.items() if name not in shared_names}
    return shared, local_only
