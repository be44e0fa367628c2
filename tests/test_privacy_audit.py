"""The one-run canary audit (simulations/privacy_audit.py): its bound, and a small run of the real DP-SGD."""
import json
import math

import pytest
from omegaconf import OmegaConf

from simulations.privacy_audit import epsilon_lower_bound, run_audit, write_outputs


def test_the_bound_refutes_only_what_the_guesses_make_unlikely():
    # all r guesses right: refuted while p(eps)^r < beta, i.e. up to log(p / (1 - p)) at p = beta^(1/r)
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 0.05) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert epsilon_lower_bound(50, 100, 0.05) == 0.0 and epsilon_lower_bound(0, 0, 0.05) == 0.0
    bounds = [epsilon_lower_bound(v, 200, 0.05) for v in (110, 130, 150, 170, 190)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert epsilon_lower_bound(150, 200, 0.01) < epsilon_lower_bound(150, 200, 0.05)   # more confidence, less


def test_a_small_audit_finds_the_leak_without_noise_and_stays_under_the_accountant_with_it(tmp_path):
    cfg = OmegaConf.create({
        "canaries": 600, "background": 20, "background_features": 4, "canary_scale": 10.0, "public_patients": 320,
        "batch_size": 320, "steps": 3, "lr": 0.001, "clip": 1.0, "coupled_clip": 1e-6, "per_study": "vmap",
        "epsilons": [2], "broken_factor": 3, "delta": 1e-5, "confidence": 0.95, "guess_counts": [50, 100, 300],
        "seed": 0, "threads": 1})
    rows = {row["arm"].split(":")[0]: row for row in run_audit(cfg)}
    assert set(rows) == {"no noise", "epsilon 2", "broken"}
    assert rows["no noise"]["white_box"]["epsilon_lower_bound"] > 3.0    # clipping alone hides nothing
    assert rows["no noise"]["black_box"]["epsilon_lower_bound"] > 3.0
    for arm in ("epsilon 2",):
        assert rows[arm]["accountant_epsilon"] == pytest.approx(2.0, rel=0.02)
        assert rows[arm]["white_box"]["epsilon_lower_bound"] <= rows[arm]["accountant_epsilon"]
        assert rows[arm]["black_box"]["epsilon_lower_bound"] <= rows[arm]["accountant_epsilon"]
    assert rows["broken"]["true_epsilon"] > 2 * rows["broken"]["accountant_epsilon"]
    write_outputs(tmp_path, cfg, list(rows.values()))
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == [r["arm"] for r in rows.values()] and saved["config"]["canaries"] == 600
    assert "| epsilon 2 |" in (tmp_path / "audit.md").read_text() and (tmp_path / "audit.png").stat().st_size > 0
