"""What a site tells the coordinator when a private round fails, and which scalars travel beside a SecAgg+ update.

Under DP-SGD only the noisy update and public constants may leave; under SecAgg+ the server should learn only the
sum. An error's text and a clear metric are neither: Flower ships an exception's text to the coordinator, and a
loss or a gradient norm is computed from the patients. So under either mechanism a failed round's reply carries a
code and a fixed message, the details going to the site's own log, and a SecAgg+ reply carries only the DP round's
public scalars.
"""
from __future__ import annotations

import logging

from shared_models.privacy_config import privacy_block

log = logging.getLogger(__name__)

# Error codes of a private round that failed (client/app.py's refusals are 4001 and 4002).
TRAINING_DIVERGED = 4003
ROUND_FAILED = 4004
PRIVACY_SETTINGS = 4005

# What a DP round may say in the clear (DpRoundResult.public_metrics without `examples`, which SecAgg+ masks in).
PUBLIC_DP_METRICS = frozenset({"epsilon", "epsilon_total", "delta", "noise_multiplier", "sample_rate", "steps"})


class NonFiniteStep(FloatingPointError):
    """A DP-SGD step met a non-finite loss or gradient norm. The values are per-study losses and norms: they go to
    the site's log when raised, and the text, which may reach the coordinator, names only the step."""

    def __init__(self, step: int | None, what: str, values: object):
        where = "a DP-SGD step" if step is None else f"DP-SGD step {step}"
        log.error("%s: non-finite %s: %s", where, what, values)
        super().__init__(f"non-finite {what} at {where} (the values are in the site's log); lower train.lr or "
                         "check the data")


def private_mechanisms(cfg) -> list[str]:
    return [name for name in ("dpsgd", "secagg") if privacy_block(cfg, name) is not None]


def withheld_error(err: BaseException, cfg) -> tuple[int, str] | None:
    """(code, fixed message) for a round that raised `err` under DP-SGD or SecAgg+, its details logged here at the
    site; None without either mechanism (the error then travels as it is).

    Settings errors (`PrivacyError`: BatchNorm, no public patient count, clip norms) name configuration, never
    data, and keep their text: the coordinator's operator needs it to fix the run."""
    from client.privacy.clipping import PrivacyError

    mechanisms = private_mechanisms(cfg)
    if not mechanisms:
        return None
    if isinstance(err, PrivacyError):
        return PRIVACY_SETTINGS, f"privacy settings: {err}"
    log.error("the round failed under %s; the coordinator gets only a code", "+".join(mechanisms), exc_info=err)
    if isinstance(err, FloatingPointError):
        return TRAINING_DIVERGED, ("training diverged (a non-finite loss or gradient); under "
                                   f"{'+'.join(mechanisms)} the values stay in the site's log")
    return ROUND_FAILED, (f"the site's round failed; under {'+'.join(mechanisms)} the error's text can carry data, "
                          "so it stays in the site's log")


def clear_metrics(metrics: dict) -> dict:
    """The scalars a SecAgg+ reply may carry beside its masked update: a DP round's public ones, nothing else
    (losses, timings and counts would tell the server about one site what the protocol hides)."""
    withheld = sorted(set(metrics) - PUBLIC_DP_METRICS)
    if withheld:
        log.info("SecAgg+: metrics %s stay at the site", withheld)
    return {name: value for name, value in metrics.items() if name in PUBLIC_DP_METRICS}
