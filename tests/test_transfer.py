"""16-bit transfer of shared parameters: what is cast, what is kept, and what the cast costs in precision."""
import numpy as np
import pytest

from shared_models.transfer import contiguous, decode_arrays, encode_arrays


def _params():
    rng = np.random.default_rng(0)
    return {"image_encoder.w": rng.normal(0, 0.05, (64, 32)).astype(np.float32),
            "image_encoder.bn.num_batches_tracked": np.array(7, np.int64)}


def test_float16_halves_the_float_bytes_and_keeps_integers():
    params = _params()
    wire = encode_arrays(params, "float16")
    assert wire["image_encoder.w"].dtype == np.float16 and wire["image_encoder.w"].nbytes == params["image_encoder.w"].nbytes // 2
    assert wire["image_encoder.bn.num_batches_tracked"].dtype == np.int64 and wire["image_encoder.bn.num_batches_tracked"] == 7
    back = decode_arrays(wire)
    assert back["image_encoder.w"].dtype == np.float32 and back["image_encoder.w"].shape == (64, 32)
    # float16 keeps 11 significant bits: relative error at most 2**-11 for normal numbers
    w = params["image_encoder.w"]
    normal = np.abs(w) > np.finfo(np.float16).tiny
    relative = np.abs(back["image_encoder.w"] - w)[normal] / np.abs(w)[normal]
    assert 0 < relative.max() <= 2.0 ** -11


def test_float32_transfer_is_the_identity():
    params = _params()
    wire = encode_arrays(params, "float32")
    for name, value in decode_arrays(wire).items():
        assert value.dtype == params[name].dtype and np.array_equal(value, params[name])


def test_values_beyond_float16_range_and_unknown_dtypes_are_refused_clearly():
    with pytest.raises(ValueError, match=r"text_encoder.big holds \|value\| 7e\+04 > 65504"):
        encode_arrays({"text_encoder.big": np.array([1.0, -7e4], np.float32)}, "float16")
    with pytest.raises(ValueError, match="transfer_dtype must be one of"):
        encode_arrays(_params(), "bfloat16")
    # NaN is not an overflow: it travels and the coordinator's update check rejects it
    assert np.isnan(encode_arrays({"w": np.array([np.nan, 1.0], np.float32)}, "float16")["w"][0])


def test_contiguous_keeps_zero_dim_arrays_zero_dim():
    counter = np.array(7, dtype=np.int64)                     # BatchNorm's num_batches_tracked
    assert np.ascontiguousarray(counter).shape == (1,)        # the numpy behaviour this guards against
    assert contiguous(counter).shape == () and int(contiguous(counter)) == 7
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    out = contiguous(strided)
    assert out.flags.c_contiguous and out.shape == (3, 2) and np.array_equal(out, strided)


def test_float16_round_trip_through_the_apps_records_and_float32_aggregation():
    """Server encodes -> site decodes, updates, encodes -> server decodes and averages, as server/app.py and
    client/app.py do it: values stay within float16 rounding, the server's arithmetic stays float32."""
    from client.app import _arrays
    from server.aggregation import weighted_mean
    from server.app import from_record, to_record

    global_params = _params()
    sent = to_record(encode_arrays(global_params, "float16"))
    assert sent.count_bytes() < 0.5 * sum(v.nbytes for v in global_params.values()) + 2 * 256  # + npy headers
    received = decode_arrays(from_record(sent))
    assert received["image_encoder.w"].dtype == np.float32
    assert received["image_encoder.bn.num_batches_tracked"].shape == () and received[
        "image_encoder.bn.num_batches_tracked"] == 7
    updates = []
    for examples, delta in ((30, 0.01), (10, -0.02)):
        site_params = {**received, "image_encoder.w": received["image_encoder.w"] + np.float32(delta)}
        reply = decode_arrays(from_record(_arrays(encode_arrays(site_params, "float16"))))
        updates.append((reply, examples))
    mean = weighted_mean(updates)
    assert mean["image_encoder.w"].dtype == np.float32
    expected = global_params["image_encoder.w"] + (30 * 0.01 + 10 * -0.02) / 40
    # |w| < 0.5 here: each float16 rounding errs by at most half an ulp (<= 2**-13); two roundings on the way
    assert np.abs(mean["image_encoder.w"] - expected).max() <= 2 * 2.0**-12
    assert np.abs(mean["image_encoder.w"] - expected).max() > 0  # it did go through float16


def test_transfer_dtype_reaches_the_sites_and_a_bad_one_is_refused_before_any_round():
    from server.app import check_supported
    from server.rounds import round_config
    from shared_models.config import compose

    assert round_config(compose(["federation.transfer_dtype=float16"]), 1, "r", {})["transfer_dtype"] == "float16"
    with pytest.raises(ValueError, match="federation.transfer_dtype must be one of"):
        check_supported(compose(["federation.transfer_dtype=bfloat16"]))
    check_supported(compose([]))
