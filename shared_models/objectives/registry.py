"""The objective registry: every objective module registers its loss terms here, as timm's `register_model` does.

An `Objective` is one config section under `objective` (its name), the loss terms it returns (keys of
`objective.lambdas`), how to build its module, the function that computes its terms from a batch's encoder
outputs, what it reads, and whether it couples the studies of a batch. The model, the schedule and DP-SGD's
sensitivity bound all read it from here, so adding an objective is one module in this package plus one
`configs/objective/*.yaml` that weights its terms: the package's modules are imported on first lookup.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

# Where a scheduled term starts: HybridMED's stage 2 or the seg start (G2D's pseudo segmentation). A term
# without one trains from step 0; `objective.schedule` places these points (shared_models/objectives/schedule.py).
SCHEDULE_POINTS = ("stage2", "seg_start")


@dataclass(frozen=True)
class Objective:
    name: str                                   # config section `objective.<name>`, key of `model.objectives`
    terms: tuple[str, ...]                      # the loss terms `loss` returns
    build: Callable[[dict, Any], nn.Module]     # (config section, model) -> module
    loss: Callable[[Any, Any, int], dict[str, Tensor]]  # (model, StepInputs, step) -> {term: value}
    inputs: tuple[str, ...]                     # encoder outputs read (`StepInputs` properties)
    batch: tuple[str, ...] = ()                 # batch keys read directly
    # True when a study's term depends on the other studies of its batch (in-batch negatives, soft targets
    # from the others' tags): DP-SGD then clips the batch's gradient of it as one vector (docs/privacy.md).
    # Its `inputs` must be rows that `StackedInputs` stacks.
    coupled: bool = False
    starts: dict[str, str] = field(default_factory=dict)  # term -> schedule point it waits for


_REGISTRY: dict[str, Objective] = {}
_discovered = False


def register_objective(name: str, *, build, inputs, terms: tuple[str, ...] | None = None, batch=(), coupled=False,
                       starts: dict[str, str] | None = None):
    """Decorator for an objective's loss function `(model, inputs, step) -> {term: value}`."""
    def register(loss):
        objective = Objective(name, tuple(terms or (name,)), build, loss, tuple(inputs), tuple(batch), coupled,
                              dict(starts or {}))
        bad = {t: p for t, p in objective.starts.items() if t not in objective.terms or p not in SCHEDULE_POINTS}
        if bad:
            raise ValueError(f"objective {name!r}: starts {bad} must map its terms {objective.terms} to one of "
                             f"{SCHEDULE_POINTS}")
        taken = {t: o.name for o in _REGISTRY.values() if o.name != name for t in o.terms if t in objective.terms}
        if taken:
            raise ValueError(f"objective {name!r} registers terms already registered by {taken}")
        _REGISTRY[name] = objective
        return loss
    return register


def unregister_objective(name: str) -> None:
    """Remove a registered objective (tests registering a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def objectives() -> dict[str, Objective]:
    """Every registered objective by name, after importing each module of this package once."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(_package_path()):
            importlib.import_module(f"{__package__}.{module.name}")
    return _REGISTRY


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def objective_of_term() -> dict[str, Objective]:
    """The objective that computes each loss term."""
    return {term: objective for objective in objectives().values() for term in objective.terms}


def coupled_terms() -> frozenset[str]:
    """The loss terms whose value for one study depends on the other studies of its batch."""
    return frozenset(term for objective in objectives().values() if objective.coupled for term in objective.terms)


def term_starts() -> dict[str, str]:
    """Each scheduled term's start point (`SCHEDULE_POINTS`); terms not listed train from step 0."""
    return {term: point for objective in objectives().values() for term, point in objective.starts.items()}
