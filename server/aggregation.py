"""The arithmetic of the aggregation rules on numpy arrays: FedAvg's weighted mean, the robust median and trimmed
mean, the server optimizers' step. server/strategy.py makes each rule a Flower strategy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

Params = dict[str, np.ndarray]


class Update(NamedTuple):
    params: Params   # one site's shared parameters
    weight: float    # its example weight (claimed, capped by server/influence.py)

# Robust rules need a majority around the middle: fewer sites than this and they would trim nothing (the median of
# two is their mean). The config is refused below it (server.validation) and so is a round that has fewer.
ROBUST_QUORUM = {"median": 3, "trimmed_mean": 3}


def _check_quorum(rule: str, updates: list) -> None:
    if len(updates) < ROBUST_QUORUM[rule]:
        raise ValueError(f"{rule} needs at least {ROBUST_QUORUM[rule]} updates, got {len(updates)}: with fewer it "
                         "trims nothing and is a plain mean")


def _stack(updates: list[Update], name: str) -> np.ndarray:
    return np.stack([params[name] for params, _ in updates]).astype(np.float64)


def _cast_like(combined: dict[str, np.ndarray], updates: list[Update]) -> Params:
    """Back to each array's dtype; integer arrays (step counters) rounded, since a float64 mean of sevens can come
    out at 6.999... and truncate to 6, depending on the order of the sites."""
    first = updates[0][0]
    return {name: (value if np.issubdtype(first[name].dtype, np.floating) else np.rint(value)).astype(first[name].dtype)
            for name, value in combined.items()}


def weighted_mean(updates: list[Update]) -> Params:
    """FedAvg: the mean of the sites' parameters weighted by their numbers of examples."""
    weights = np.array([n for _, n in updates], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError(f"FedAvg needs a positive number of examples, got {weights.tolist()}")
    weights /= weights.sum()
    combined = {name: np.tensordot(weights, _stack(updates, name), axes=1) for name in updates[0][0]}
    return _cast_like(combined, updates)


def coordinate_median(updates: list[Update]) -> Params:
    """Coordinate-wise median: robust to a minority of arbitrary updates; ignores example counts."""
    _check_quorum("median", updates)
    return _cast_like({name: np.median(_stack(updates, name), axis=0) for name in updates[0][0]}, updates)


def trimmed_per_side(sites: int, trim_fraction: float) -> int:
    """How many values trimmed_mean drops at each end of each coordinate: at least one, leaving at least one."""
    return min(max(1, int(sites * trim_fraction)), (sites - 1) // 2)


def trimmed_mean(updates: list[Update], trim_fraction: float = 0.2) -> Params:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values of each coordinate, at
    least one at each end (with 3 or 4 sites 20 % would round down to none)."""
    if not 0 < trim_fraction < 0.5:
        raise ValueError(f"federation.trim_fraction must be in (0, 0.5), got {trim_fraction}")
    _check_quorum("trimmed_mean", updates)
    cut = trimmed_per_side(len(updates), trim_fraction)
    combined = {}
    for name in updates[0][0]:
        values = np.sort(_stack(updates, name), axis=0)
        combined[name] = values[cut : len(updates) - cut].mean(axis=0)
    return _cast_like(combined, updates)


# Normalisation statistics are averages, not weights: a server step would extrapolate them (a running
# variance can go negative), so they take the sites' mean as in FedAvg.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STATISTICS


@dataclass
class ServerOptimizer:
    """A server step on the pseudo-gradient delta = mean(update) - global: FedAdam / FedYogi (Reddi et al. 2021),
    adaptive; or FedAvgM (Hsu et al. 2019), momentum m = beta1 * m + delta, global += lr * m (lr 1, beta1 0
    is FedAvg). Normalisation statistics take the mean instead (`STATISTICS`).

    Its moments carry across rounds and are checkpointed with the global model (`state_dict`).
    """

    kind: str = "adam"  # "adam" | "yogi" | "momentum"
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)
    steps: int = 0

    def step(self, global_params: Params, averaged: Params) -> Params:
        new = {}
        for name, current in global_params.items():
            if is_statistic(name):
                new[name] = averaged[name]
                continue
            delta = averaged[name].astype(np.float64) - current.astype(np.float64)
            if self.kind == "momentum":
                self.m[name] = self.beta1 * self.m.get(name, np.zeros_like(delta)) + delta
                new[name] = (current + self.lr * self.m[name]).astype(current.dtype)
                continue
            m = self.beta1 * self.m.get(name, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v_prev = self.v.get(name, np.full_like(delta, self.tau**2))
            if self.kind == "yogi":
                v = v_prev - (1 - self.beta2) * delta**2 * np.sign(v_prev - delta**2)
            else:
                v = self.beta2 * v_prev + (1 - self.beta2) * delta**2
            self.m[name], self.v[name] = m, v
            new[name] = (current + self.lr * m / (np.sqrt(v) + self.tau)).astype(current.dtype)
        self.steps += 1
        return new

    def state_dict(self) -> Params:
        state = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return state | {"steps": np.array(self.steps, dtype=np.int64)}

    def load_state_dict(self, state: Params) -> None:
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v.")}
        self.steps = int(state.get("steps", 0))
