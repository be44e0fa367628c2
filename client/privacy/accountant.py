"""Epsilon of a DP-SGD history with Opacus's accountants; the history (noise, sample rate, steps) is the state."""
from __future__ import annotations

from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# One entry per stretch of steps with the same settings: (noise multiplier, sample rate, steps).
Spend = tuple[float, float, int]

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _accountant(name: str):
    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy accountant {name!r} is unknown; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def epsilon_spent(history: list[Spend], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of all of `history` composed (never a sum of per-round epsilons)."""
    spends = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not spends:
        return 0.0
    if any(s <= 0 for s, _, _ in spends):
        return float("inf")  # a noiseless step is not private at all
    state = _accountant(accountant)
    state.history = spends
    return float(state.get_epsilon(delta=delta))


@lru_cache(maxsize=64)   # a pure function of its arguments, and Opacus's search takes seconds (a site asks every round)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) that keeps `steps` steps within target_epsilon."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))
