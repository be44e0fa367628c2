"""How shared parameters travel: optionally as float16, cast back to float32 on receipt (`federation.transfer_dtype`)."""
from __future__ import annotations

import numpy as np

TRANSFER_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Under SecAgg+ the round's instructions travel in Flower's legacy form: unnamed arrays, so their names go in the
# config (joined by newlines: legacy configs hold scalars only), with the largest example count a site may weigh
# its change with (SecAgg+'s `max_weight`).
SECAGG_NAMES_KEY = "secagg_names"
SECAGG_MAX_WEIGHT_KEY = "secagg_max_weight"


def contiguous(value) -> np.ndarray:
    """A C-contiguous copy (or view) of `value` with its shape kept: np.ascontiguousarray turns 0-d arrays
    (BatchNorm's num_batches_tracked) into shape (1,), which then fails validation against the model's ()."""
    return np.ascontiguousarray(value).reshape(np.shape(value))


def check_transfer_dtype(dtype: str) -> None:
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"federation.transfer_dtype must be one of {TRANSFER_DTYPES}, got {dtype!r}")


def encode_arrays(params: dict[str, np.ndarray], dtype: str = "float32") -> dict[str, np.ndarray]:
    """The arrays as they go on the wire: float arrays cast to `dtype`; integer arrays (step counters) as they are.

    Raises ValueError when `dtype` is unknown, or when a finite value does not fit in float16 (it would arrive
    as Inf and the update would be rejected as non-finite; better to say why at the sender)."""
    check_transfer_dtype(dtype)
    wire = np.dtype(dtype)
    encoded = {}
    for name, value in params.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating) or value.dtype == wire:
            encoded[name] = value
            continue
        if wire == np.float16 and value.size:
            largest = float(np.abs(value[np.isfinite(value)]).max(initial=0.0))
            if largest > FLOAT16_MAX:
                raise ValueError(f"shared parameter {name} holds |value| {largest:.3g} > {FLOAT16_MAX:.0f}, the float16 "
                                 "maximum; use federation.transfer_dtype=float32 for this model")
        encoded[name] = value.astype(wire)
    return encoded


def decode_arrays(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays as received, with float16 ones widened back to float32 (the dtype the model and aggregation use)."""
    return {name: value.astype(np.float32) if value.dtype == np.float16 else value for name, value in params.items()}
