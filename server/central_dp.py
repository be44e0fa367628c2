"""Site-level DP-FedAvg at the coordinator with Flower's fixed-clipping primitives (privacy=central_dp).

Flower's `DifferentialPrivacyServerSideFixedClipping` wraps a Flower `Strategy`; this ServerApp runs its own
push/pull loop (refusals, validation, checkpoints), so it applies the same mechanism with the same parameters
directly: each accepted site's update (its parameters minus the global ones) is clipped to L2 norm
`clipping_norm` over all floating shared arrays, the clipped updates are averaged with equal weights, and
Gaussian noise of std `noise_multiplier * clipping_norm / sites` is added to the mean. The privacy unit is
the site; the coordinator sees each update in the clear and is trusted.
"""
from __future__ import annotations

import numpy as np
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, clip_inputs_inplace, compute_stdv, get_norm

Params = dict[str, np.ndarray]


def dp_fedavg(global_params: Params, updates: list[Params], clipping_norm: float, noise_multiplier: float) -> Params:
    """The noised equal-weight mean of the clipped site updates, as new global parameters."""
    if not updates:
        raise ValueError("no valid update to aggregate")
    floating = [name for name, value in global_params.items() if np.issubdtype(value.dtype, np.floating)]
    reference = [global_params[name].astype(np.float64) for name in floating]
    summed = [np.zeros_like(r) for r in reference]
    for update in updates:
        delta = [update[name].astype(np.float64) - ref for name, ref in zip(floating, reference)]
        if get_norm(delta) > 0:  # Flower's clip divides by the norm; an unchanged update needs no clipping
            clip_inputs_inplace(delta, clipping_norm)
        for total, ref, step in zip(summed, reference, delta):
            total += ref + step
    mean = [total / len(updates) for total in summed]
    add_gaussian_noise_inplace(mean, compute_stdv(noise_multiplier, clipping_norm, len(updates)))
    combined = dict(global_params)  # integer buffers (e.g. position ids) are the same everywhere: keep them
    combined.update({name: value.astype(global_params[name].dtype) for name, value in zip(floating, mean)})
    return combined
