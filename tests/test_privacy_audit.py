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
    # strict JSON: the noiseless arm's infinite epsilon is null, not the non-standard `Infinity`
    assert rows["no noise"]["accountant_epsilon"] == math.inf and \
        next(a for a in saved["arms"] if a["arm"].startswith("no noise"))["accountant_epsilon"] is None
    assert "Infinity" not in (tmp_path / "audit.json").read_text()
    assert "| epsilon 2 |" in (tmp_path / "audit.md").read_text() and (tmp_path / "audit.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- re-linkage audit
def test_relinkage_maths_on_constructed_embeddings_with_known_answers():
    import numpy as np

    from simulations.relinkage_audit import (attack_summary, membership_auc, relinkage_scores, split_patients,
                                             tpr_at_fpr)

    assert relinkage_scores(np.eye(4), np.eye(4) * 3.0) == pytest.approx(np.ones(4))     # own report: cos 1, others 0
    assert relinkage_scores(np.eye(3), np.eye(3)[[1, 2, 0]]) == pytest.approx(-np.ones(3))   # every pair swapped
    rng = np.random.default_rng(0)
    n, dim = 400, 64
    texts = rng.standard_normal((n, dim))
    is_member = np.arange(n) < n // 2
    # members: the image embedding is (nearly) its own report's; non-members: unrelated to every report
    images = np.where(is_member[:, None], texts + 0.01 * rng.standard_normal((n, dim)), rng.standard_normal((n, dim)))
    perfect = attack_summary(relinkage_scores(images, texts), is_member, 0.01, 200, 0.95, 0)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr"]["tpr"] == 1.0 and perfect["auc_ci"] == [1.0, 1.0]
    independent = attack_summary(relinkage_scores(rng.standard_normal((n, dim)), texts), is_member, 0.01, 200, 0.95, 0)
    assert 0.42 < independent["auc"] < 0.58
    assert independent["auc_ci"][0] < 0.5 < independent["auc_ci"][1] and independent["tpr_at_fpr"]["tpr"] < 0.1
    assert membership_auc([1.0, 1.0], [1.0]) == 0.5 and membership_auc([2.0, 0.0], [1.0]) == 0.5
    assert membership_auc([3.0], [1.0, 2.0]) == 1.0 and membership_auc([0.0], [1.0, 2.0]) == 0.0
    # 100 non-members scored 0..99: 1 % FPR allows one of them above the threshold (98)
    point = tpr_at_fpr(np.array([98.5, 99.5, 50.0]), np.arange(100.0), 0.01)
    assert point["tpr"] == pytest.approx(2 / 3) and point["fpr"] == 0.01 and point["meaningful"]
    few = tpr_at_fpr(np.array([97.5, 99.5, 50.0]), np.arange(50.0) * 2, 0.01)   # 50: no false positive allowed
    assert few["false_positives_allowed"] == 0 and few["tpr"] == pytest.approx(1 / 3) and not few["meaningful"]
    members, nonmembers = split_patients([f"p{i % 30}" for i in range(90)], 10, 15, seed=1)
    assert len(members) == 10 and len(nonmembers) == 15 and not members & nonmembers
    with pytest.raises(ValueError, match="at most the collection's 30 patients"):
        split_patients([f"p{i}" for i in range(30)], 20, 15, seed=1)


def test_a_tiny_relinkage_audit_trains_each_arm_and_writes_its_table(phantom_200, tmp_path):
    from pathlib import Path

    from helpers.data import PHANTOM_200
    from simulations.privacy_audit import chosen_audits
    from simulations.relinkage_audit import run_relinkage

    root = Path(phantom_200[0])
    cfg = OmegaConf.create({
        "audits": ["relinkage"], "delta": 1e-5, "confidence": 0.95,
        "relinkage": {"overrides": [*PHANTOM_200, f"cache_dir={root.parent.parent}",
                                    "model=tiny_cnn", "objective=clip", "model.projection_head=linear",
                                    "model.image.norm=group"],
                      "members": 3, "nonmembers": 6, "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0,
                      "augment": False, "epsilons": [8], "clip": 1.0, "coupled_clip": 1.0, "per_study": "auto",
                      "fpr": 0.01, "bootstrap": 50, "seed": 0}})
    assert chosen_audits(cfg) == ["relinkage"]
    with pytest.raises(ValueError, match="choose one or more of"):
        chosen_audits(OmegaConf.create({"audits": ["relinkage", "canaries"]}))
    rows = run_relinkage(cfg)
    assert [r["arm"] for r in rows] == ["untrained", "no DP", "DP-SGD epsilon 8"]
    for row in rows:
        assert 0.0 <= row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1] <= 1.0
        assert 0.0 <= row["tpr_at_fpr"]["tpr"] <= 1.0 and row["tpr_at_fpr"]["fpr"] <= 0.01
        assert row["members"] >= 3 and row["nonmembers"] >= 6 and not row["tpr_at_fpr"]["meaningful"]
    assert rows[1]["noise_multiplier"] == 0.0 and rows[2]["accountant_epsilon"] == pytest.approx(8.0, rel=0.02)
    assert rows[2]["noise_multiplier"] > 0 and rows[0]["steps"] == 0 and rows[2]["steps"] == 2
    write_outputs(tmp_path, cfg, [], rows)
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["arms"] == [] and [r["arm"] for r in saved["relinkage"]] == [r["arm"] for r in rows]
    table = (tmp_path / "audit.md").read_text()
    assert "| DP-SGD epsilon 8 | 8.00 |" in table and "allows no false positive" in table
    assert not (tmp_path / "audit.png").exists()       # the plot is the canary audit's


# ------------------------------------------------------------------------------------------- a federation's run
def _run_folder(root, partition, sites):
    root.mkdir()
    (root / "partition.json").write_text(json.dumps(partition))
    (root / "sites").mkdir()
    for index, site in enumerate(sites):
        (root / "sites" / f"{index}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(site)))
    return root


def test_a_runs_members_and_collection_come_from_its_partition_and_site_files(tmp_path):
    from simulations.relinkage_audit import RunFolderError, run_membership

    same = {"catalog": "/data/catalog.sqlite", "cache": "/data/cache"}
    run = _run_folder(tmp_path / "run", {"site_0": {"studies": ["s1", "s2"]}, "site_1": {"studies": ["s3"]}},
                      [same, same])
    studies, catalog, cache = run_membership(run)
    assert studies == {"s1", "s2", "s3"} and str(catalog) == "/data/catalog.sqlite" and str(cache) == "/data/cache"

    with pytest.raises(RunFolderError, match="partition.json: not a readable partition"):
        run_membership(tmp_path)
    bad = _run_folder(tmp_path / "string", {"site_0": {"studies": "s1"}}, [same])
    with pytest.raises(RunFolderError, match="site 'site_0' has no list of study ids"):
        run_membership(bad)
    empty = _run_folder(tmp_path / "empty", {}, [same])
    with pytest.raises(RunFolderError, match="no site with studies"):
        run_membership(empty)
    mixed = _run_folder(tmp_path / "mixed", {"site_0": {"studies": ["s1"]}},
                        [same, {"catalog": "/other/catalog.sqlite", "cache": "/data/cache"}])
    with pytest.raises(RunFolderError, match="name 2 collections"):
        run_membership(mixed)
    no_catalog = _run_folder(tmp_path / "no_catalog", {"site_0": {"studies": ["s1"]}}, [{"cache": "/data/cache"}])
    with pytest.raises(RunFolderError, match="no 'catalog' and 'cache'"):
        run_membership(no_catalog)
    listed = _run_folder(tmp_path / "listed", {"site_0": {"studies": ["s1"]}}, [same])
    (listed / "sites" / "0.yaml").write_text("- a list\n- not a site\n")
    with pytest.raises(RunFolderError, match="no 'catalog' and 'cache'"):
        run_membership(listed)
    (listed / "sites" / "0.yaml").write_text("catalog: [unclosed\n")
    with pytest.raises(RunFolderError, match="0.yaml: not a readable site file"):
        run_membership(listed)


def test_a_runs_claimed_epsilon_is_its_highest_sites_or_the_central_one(tmp_path):
    from simulations.relinkage_audit import RunFolderError, run_epsilon

    assert run_epsilon(tmp_path) == math.inf                                  # no summary.json
    (tmp_path / "summary.json").write_text(json.dumps({"epsilon": {}, "central_epsilon": None}))
    assert run_epsilon(tmp_path) == math.inf                                  # a run without DP
    (tmp_path / "summary.json").write_text(json.dumps({"epsilon": {"site_0": 2.5, "site_1": 3.75},
                                                       "central_epsilon": None}))
    assert run_epsilon(tmp_path) == 3.75
    (tmp_path / "summary.json").write_text(json.dumps({"epsilon": {"site_0": 2.5}, "central_epsilon": 6.0}))
    assert run_epsilon(tmp_path) == 6.0
    for edited in ({"epsilon": {"site_0": "about 3"}}, {"epsilon": ["site_0", 3.0]},
                   {"epsilon": {}, "central_epsilon": {"value": 6.0}}):
        (tmp_path / "summary.json").write_text(json.dumps(edited))
        with pytest.raises(RunFolderError, match="summary.json: 'epsilon' must map each site to a number"):
            run_epsilon(tmp_path)
