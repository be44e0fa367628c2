"""When each loss term starts: `objective.schedule` resolved once against the run's total optimizer steps.

HybridMED's stage 2 and the seg start (G2D's pseudo segmentation, after a global-only warm-up) are points of the
run, given either as a fraction of its steps (`stage2_at`, `seg_start_at`: every term trains in a run of any length)
or as absolute steps (`stage2_step`, `seg_start_step`: the papers' schedules; when set they win over the fractions).
The seg start is not the lr warm-up (`train.warmup_steps`); its keys were `warmup_at` / `warmup_steps` before, and
checkpoints written then are read with `LEGACY_KEYS`.
`start_step: {term: step}` pins one term's start. Which term waits for which point is registered with its
objective (`Objective.starts`).

The run's total is the count of steps the model's step numbers span: `train.steps` for a centralized run,
`rounds x local_steps` for a federation (each site continues its steps over the rounds; under cyclic the
model passed from site to site does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shared_models.objectives.registry import term_starts

POINTS = {"stage2": ("stage2_step", "stage2_at"), "seg_start": ("seg_start_step", "seg_start_at")}
KEYS = [key for pair in POINTS.values() for key in pair] + ["start_step"]
# The seg start's keys before they were told apart from the lr warm-up (docs/glossary.md); old checkpoints hold them.
LEGACY_KEYS = {"warmup_steps": "seg_start_step", "warmup_at": "seg_start_at"}


@dataclass(frozen=True)
class Schedule:
    stage2_step: int
    seg_start_step: int
    start_step: dict[str, int]   # every weighted term's first step

    def active_terms(self, step: int) -> list[str]:
        return [term for term, start in self.start_step.items() if step >= start]

    def hybridmed_stage(self, step: int) -> int:
        """HybridMED's stage at `step`: 1 trains summarisation alone, 2 every term."""
        return 2 if step >= self.stage2_step else 1


def _point(schedule: dict, point: str, total_steps: int | None) -> int:
    absolute, fraction = POINTS[point]
    if schedule.get(absolute) is not None:
        return int(schedule[absolute])
    share = schedule.get(fraction)
    if share is None:
        return 0
    if not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"objective.schedule.{fraction}={share} must be a fraction of the run's steps in [0, 1]")
    if total_steps is None:
        raise ValueError(f"objective.schedule.{fraction}={share} is a fraction of the run's steps, but no total was "
                         f"given; pass the run's total steps, or set objective.schedule.{absolute} instead")
    # The epsilon keeps e.g. 0.29 x 100 at 29 (29 in decimal, 28.999... in binary).
    return math.floor(float(share) * int(total_steps) + 1e-9)


def resolve_schedule(objective, total_steps: int | None = None) -> Schedule:
    """`objective.schedule` in absolute steps for a run of `total_steps` (needed only when a point is a fraction)."""
    schedule = dict(objective.get("schedule") or {})
    renamed = sorted(set(schedule) & set(LEGACY_KEYS))
    if renamed:
        raise ValueError(f"objective.schedule.{renamed[0]} is now objective.schedule.{LEGACY_KEYS[renamed[0]]} "
                         "(when seg starts; the lr warm-up is train.warmup_steps)")
    unknown = set(schedule) - set(KEYS)
    if unknown:
        raise ValueError(f"objective.schedule has unknown keys {sorted(unknown)}; known: {', '.join(KEYS)}")
    points = {point: _point(schedule, point, total_steps) for point in POINTS}
    pinned = dict(schedule.get("start_step") or {})
    starts = term_starts()
    weighted = [term for term, weight in objective["lambdas"].items() if float(weight) > 0]
    if set(pinned) - set(objective["lambdas"]):
        raise ValueError(f"objective.schedule.start_step names terms {sorted(set(pinned) - set(objective['lambdas']))} "
                         f"that objective.lambdas does not weight")
    start_step = {term: int(pinned[term]) if pinned.get(term) is not None else points.get(starts.get(term), 0)
                  for term in weighted}
    return Schedule(points["stage2"], points["seg_start"], start_step)


def federation_steps(cfg) -> int:
    """The steps a federated run's schedule spans: each round continues the last one's `local_steps`."""
    federation = cfg["federation"]   # a composed config or its plain-dict copy (a checkpoint's meta)
    return int(federation["rounds"]) * int(federation["local_steps"])


def upgrade_schedule_keys(objective: dict) -> dict:
    """A stored objective config (a checkpoint's meta.json) with the seg start's old keys given their new names."""
    schedule = dict(objective.get("schedule") or {})
    if not set(schedule) & set(LEGACY_KEYS):
        return objective
    for old, new in LEGACY_KEYS.items():
        if old in schedule:
            value = schedule.pop(old)
            schedule.setdefault(new, value)
    return {**objective, "schedule": schedule}
