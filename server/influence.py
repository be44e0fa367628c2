"""Bounded influence: how far one site's reply can move the global model, whatever the strategy.

Before aggregation each site's update (its change to the global floating-point arrays) is measured. Its norm is
held to `federation.max_update_norm` (absolute; null = off) and to `update_norm_factor` x a reference norm: the
round's lower median when two or more sites replied (a minority cannot raise it), otherwise (cyclic, SecAgg+'s one
mean) the median of the last rounds' norms. An update above the bound is scaled down to it (`update_norm_action:
clip`) or rejected (`reject`). Example weights are capped by `max_examples_weight`, by `examples_growth_factor` x
what the site declared at its first round, and by `examples_weight_factor` x the round's lower median weight.
Integer arrays (BatchNorm's step counters) carry no weight in the norm and are never scaled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from server.validation import Params, SiteReply

HISTORY_ROUNDS = 5   # the last rounds' reference norms a single update is held to


@dataclass
class Bounds:
    max_update_norm: float | None = None
    update_norm_factor: float | None = 4.0
    update_norm_action: str = "clip"
    max_examples_weight: float | None = None
    examples_growth_factor: float | None = 2.0
    examples_weight_factor: float | None = 10.0

    @classmethod
    def from_config(cls, fed) -> "Bounds":
        defaults = cls()
        return cls(**{key: OmegaConf.select(fed, key, default=getattr(defaults, key)) for key in cls.__dataclass_fields__})


def _floating(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def update_norm(update: Params, global_params: Params) -> float:
    """L2 norm of the change to the global floating-point arrays (inf where it overflows float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.sum((update[name].astype(np.float64) - value.astype(np.float64)) ** 2))
                    for name, value in global_params.items() if _floating(value))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def scaled(update: Params, global_params: Params, scale: float) -> Params:
    """The update whose change to the global floating-point arrays is multiplied by `scale`."""
    out = {}
    for name, value in update.items():
        ref = global_params[name]
        if not _floating(ref):
            out[name] = value
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            change = np.nan_to_num(value.astype(np.float64) - ref.astype(np.float64), posinf=0.0, neginf=0.0)
        out[name] = (ref.astype(np.float64) + scale * change).astype(ref.dtype) if scale > 0 else ref.copy()
    return out


def lower_median(values: list[float]) -> float:
    """The median, or of an even count the lower middle value: a minority of large values cannot raise it."""
    return sorted(values)[(len(values) - 1) // 2]


def norm_bound(norms: list[float], history: list[float], bounds: Bounds) -> tuple[float | None, str]:
    """The largest update norm the round accepts and why (None: no bound applies)."""
    limits = []
    if bounds.max_update_norm is not None:
        limits.append((float(bounds.max_update_norm), "federation.max_update_norm"))
    if bounds.update_norm_factor is not None:
        k = float(bounds.update_norm_factor)
        if len(norms) >= 2:
            reference = lower_median(norms)
            limits.append((k * reference, f"{k:g} x the round's median norm {reference:.3g}"))
        elif history:
            reference = lower_median(history[-HISTORY_ROUNDS:])
            limits.append((k * reference, f"{k:g} x the last rounds' median norm {reference:.3g}"))
    return min(limits) if limits else (None, "")


def cap_weights(replies: list[SiteReply], first_examples: dict[str, int], bounds: Bounds) -> None:
    """Set each reply's `weight`: its claimed examples under the absolute, growth and relative caps."""
    for reply in replies:
        caps = [(float(reply.examples), "")]
        if bounds.max_examples_weight is not None:
            caps.append((float(bounds.max_examples_weight), "federation.max_examples_weight"))
        first = first_examples.get(reply.site)
        if bounds.examples_growth_factor is not None and first is not None:
            caps.append((float(bounds.examples_growth_factor) * first,
                         f"{bounds.examples_growth_factor:g} x the {first} examples it declared first"))
        reply.weight, why = min(caps)
        if why:
            reply.notes.append(f"examples {reply.examples} weighted as {reply.weight:g} ({why})")
    if bounds.examples_weight_factor is not None and len(replies) >= 2:
        reference = lower_median([r.weight for r in replies])
        limit = float(bounds.examples_weight_factor) * reference
        for reply in replies:
            if reply.weight > limit:
                reply.notes.append(f"examples {reply.examples} weighted as {limit:g} ({bounds.examples_weight_factor:g} "
                                   f"x the round's median weight {reference:g})")
                reply.weight = limit


def bound_influence(global_params: Params, replies: list[SiteReply], history: list[float], bounds: Bounds,
                    first_examples: dict[str, int]) -> tuple[list[SiteReply], list[tuple[SiteReply, list[str]]]]:
    """(replies kept, with bounded updates and capped weights; (reply, reasons) rejected)."""
    norms = [update_norm(r.update, global_params) for r in replies]
    limit, why = norm_bound(norms, history, bounds)
    kept, rejected = [], []
    for reply, norm in zip(replies, norms):
        reply.norm = norm
        if limit is not None and norm > limit:
            if bounds.update_norm_action == "reject":
                rejected.append((reply, [f"update norm {norm:.3g} above the bound {limit:.3g} ({why})"]))
                continue
            reply.scale = limit / norm if math.isfinite(norm) else 0.0
            reply.update = scaled(reply.update, global_params, reply.scale)
            reply.notes.append(f"update norm {norm:.3g} scaled to {limit:.3g} ({why})")
        kept.append(reply)
    cap_weights(kept, first_examples, bounds)
    return kept, rejected


def reference_norm(kept: list[SiteReply]) -> float | None:
    """What a round adds to the norm history: the lower median of its accepted norms, after scaling."""
    return lower_median([r.norm * r.scale for r in kept]) if kept else None
