"""Projection heads from an encoder's global feature to the contrastive space, by name (`model.projection_head`)."""
from __future__ import annotations

from torch import nn


def linear_head(in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


def mlp_bn_head(in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    # MGCA's global embedding head (ASG builds on MGCA's code): the last BatchNorm, without affine
    # parameters, standardises every output dimension over the batch, so the embeddings cannot all
    # collapse onto one direction -- the trap random-init encoders fall into within a few steps.
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
        nn.BatchNorm1d(out_dim, affine=False),
    )


PROJECTION_HEADS = {"linear": linear_head, "mlp_bn": mlp_bn_head}


def create_projection_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    if kind not in PROJECTION_HEADS:
        raise ValueError(f"model.projection_head must be one of {sorted(PROJECTION_HEADS)}, got {kind!r}")
    return PROJECTION_HEADS[kind](in_dim, out_dim, hidden_dim)
