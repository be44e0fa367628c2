"""Site-level DP-FedAvg at the coordinator with Flower's fixed-clipping primitives (privacy=central_dp), and its
accountant.

Flower's `DifferentialPrivacyServerSideFixedClipping` wraps a Flower `Strategy` and works on the round's Messages
in `aggregate_train`, with a fixed number of sampled sites and NumPy's global generator for the noise; here the
updates are the trust boundary's checked ones (server/trust_boundary.py), sites are Poisson-sampled and the noise
comes from the OS's entropy, so the ServerApp applies the same mechanism directly in the strategy's place (McMahan
et al. 2018): each round every connected site is asked with probability `site_fraction` (Poisson, secret coins); each
accepted site's update (its parameters minus the global ones) is clipped to L2 norm `clipping_norm` over all
floating shared arrays; Gaussian noise of std `noise_multiplier * clipping_norm` is added to their sum, and the sum
is divided by the expected number of sites, `site_fraction * connected sites` (at a fraction of 1, the sites that
replied, as Flower does). The privacy unit is the site (add or remove one site's data); the coordinator sees each
update in the clear and is trusted. One round is the Sampled Gaussian Mechanism with rate `site_fraction` and
noise multiplier `noise_multiplier`, so the run's epsilon is Opacus's accountant over (noise, rate, rounds).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from client.privacy.accountant import ACCOUNTANTS, epsilon_spent

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class CentralDp:
    """The `privacy.central_dp` block."""

    noise_multiplier: float
    clipping_norm: float
    site_fraction: float = 1.0     # each connected site is asked each round with this probability
    delta: float = 1e-5            # the delta central epsilon is reported at (per site of the federation)
    accountant: str = "rdp"

    def __post_init__(self):
        for name in ("noise_multiplier", "clipping_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"privacy.central_dp.{name} must be a finite number > 0, got {value!r}"
                                 + (" (a noiseless DP-FedAvg is not private at all)" if name == "noise_multiplier"
                                    else ""))
        if not 0 < self.site_fraction <= 1:
            raise ValueError(f"privacy.central_dp.site_fraction must be in (0, 1], got {self.site_fraction!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.central_dp.delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.central_dp.accountant={self.accountant!r}; choose one of {sorted(ACCOUNTANTS)}")

    @classmethod
    def from_config(cls, block) -> "CentralDp":
        values = dict(block)
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"privacy.central_dp has unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    def epsilon(self, rounds: int) -> float:
        """Central epsilon at `delta` after `rounds` released rounds (composed, not summed)."""
        return epsilon_spent([(self.noise_multiplier, self.site_fraction, rounds)], self.delta, self.accountant)

    def round_metrics(self, round_: int) -> dict[str, float]:
        """What the registry records for round `round_` (1-based; every round before it released a model)."""
        return {"central_epsilon": self.epsilon(round_), "central_epsilon_round": self.epsilon(1),
                "central_delta": self.delta, "central_noise_multiplier": float(self.noise_multiplier),
                "central_site_fraction": float(self.site_fraction)}

    def sample_sites(self, nodes: list[int]) -> list[int]:
        """Each node independently with probability site_fraction, from the OS's entropy (who is asked must not
        be replayable: the amplification by sampling rests on it)."""
        if self.site_fraction >= 1:
            return list(nodes)
        rng = secrets.SystemRandom()
        return [node for node in nodes if rng.random() < self.site_fraction]

    def aggregate(self, global_params: Params, updates: list[Params], connected: int) -> Params:
        expected = self.site_fraction * connected if self.site_fraction < 1 else len(updates)
        return dp_fedavg(global_params, updates, self.clipping_norm, self.noise_multiplier, expected)


def dp_fedavg(global_params: Params, updates: list[Params], clipping_norm: float, noise_multiplier: float,
              expected_sites: float | None = None) -> Params:
    """Global parameters plus (the sum of the clipped site updates + N(0, (noise * clip)^2 I)) / expected_sites
    (default: the number of updates, i.e. the noised equal-weight mean). A run's config refuses a zero noise
    multiplier (`CentralDp`); this primitive takes one so that its clipping can be tested alone."""
    if not updates:
        raise ValueError("no valid update to aggregate")
    denominator = float(expected_sites if expected_sites is not None else len(updates))
    floating = [name for name, value in global_params.items() if np.issubdtype(value.dtype, np.floating)]
    reference = [global_params[name].astype(np.float64) for name in floating]
    summed = [np.zeros_like(r) for r in reference]
    for update in updates:
        delta = [update[name].astype(np.float64) - ref for name, ref in zip(floating, reference)]
        if get_norm(delta) > 0:  # Flower's clip divides by the norm; an unchanged update needs no clipping
            clip_inputs_inplace(delta, clipping_norm)
        for total, step in zip(summed, delta):
            total += step
    # On the sum, whose sensitivity is clipping_norm. From the OS's entropy, not NumPy's global generator (Flower's
    # add_gaussian_noise_inplace): a generator seeded with the run's seed would let anyone with the config replay it.
    noise = np.random.default_rng(secrets.randbits(128))
    for total in summed:
        total += noise.normal(0.0, noise_multiplier * clipping_norm, total.shape)
    combined = dict(global_params)  # integer buffers (e.g. position ids) are the same everywhere: keep them
    combined.update({name: (ref + total / denominator).astype(global_params[name].dtype)
                     for name, ref, total in zip(floating, reference, summed)})
    return combined
