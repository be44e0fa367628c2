"""Patient-level sampling: label fractions and patient-disjoint train/val/test splits, reproducible per seed."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _patient_order(patient_ids: Sequence[str], seed: int) -> np.ndarray:
    """Unique patients in a seed-determined random order (sorted first, so input order does not matter)."""
    patients = np.unique(np.asarray(patient_ids, dtype=object).astype(str))
    return np.random.default_rng(seed).permutation(patients)


def sample_fraction(patient_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Indices of the rows belonging to a `fraction` of the patients (at least one), all their studies.

    For one seed the samples are nested: the 1 % patients are among the 10 % patients, which are
    among the 100 % — a larger fraction only adds patients, so curves over fractions are not
    confounded by which patients were drawn."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1]; got {fraction}")
    if len(patient_ids) == 0:
        raise ValueError("cannot sample a label fraction from an empty training set")
    order = _patient_order(patient_ids, seed)
    keep = max(1, int(round(fraction * len(order))))
    chosen = set(order[:keep].tolist())
    return np.flatnonzero([str(p) in chosen for p in patient_ids])


def split_by_patient(patient_ids: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices per split name (e.g. {"train": 0.7, "val": 0.1, "test": 0.2}); no patient is in two splits.

    Fractions are of patients, must sum to 1, and every split with a positive fraction gets at
    least one patient when there are enough patients."""
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be non-negative and sum to 1; got {fractions}")
    order = _patient_order(patient_ids, seed)
    if len(order) < sum(f > 0 for f in fractions.values()):
        raise ValueError(f"{len(order)} patients cannot fill {len(fractions)} patient-disjoint splits")
    bounds = np.round(np.cumsum([0.0, *fractions.values()]) * len(order)).astype(int)
    # Give an empty positive split one patient from the largest split, so no split is silently empty.
    sizes = np.diff(bounds)
    for i, f in enumerate(fractions.values()):
        if f > 0 and sizes[i] == 0:
            sizes[np.argmax(sizes)] -= 1
            sizes[i] = 1
    bounds = np.r_[0, np.cumsum(sizes)]
    split_of = {}
    for i, name in enumerate(fractions):
        for p in order[bounds[i]:bounds[i + 1]]:
            split_of[p] = name
    rows = np.array([split_of[str(p)] for p in patient_ids])
    return {name: np.flatnonzero(rows == name) for name in fractions}
