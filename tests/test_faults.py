"""Faults a federation survives: a site or the coordinator killed mid-run, spoiled updates, a truncated checkpoint.

The deployment scenarios share one real deployment on 127.0.0.1 (TLS + node-auth SuperLink with a persistent
database, two `client/run.py` sites), and the two crashes share one run; every process is stopped by PID. A catalog
index killed mid-way is covered by tests/test_catalog_index.py::test_killed_index_resumes_without_duplicates_or_losses.
"""
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from server.checkpoints import save_round
from server.registry import Registry
from simulations.flower import stage_app

from helpers.deployment import deploy, needs_flwr

TESTS = Path(__file__).resolve().parent
# A killed site is left out of its round once the SuperLink holds it offline (two missed 30 s heartbeats), at the
# latest when the round times out; the timeout must cover a live site's round on a busy machine.
ROUND_TIMEOUT_S = 240
BASE = (f"federation.local_steps=2 train.batch_size=4 federation.poll_s=0.1 federation.min_sites=1 "
        f"federation.round_timeout_s={ROUND_TIMEOUT_S}")


def _faulty_app(target: Path) -> Path:
    """The app bundle with the test-only ClientApp that can spoil a site's replies (see tests/faulty_site.py)."""
    app = stage_app(target)
    shutil.copy(TESTS / "faulty_site.py", app / "client" / "faulty_site.py")
    pyproject = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "client.app:app"', 'clientapp = "client.faulty_site:app"'))
    return app


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with deploy(tmp_path_factory, "faults", app=lambda folder: _faulty_app(folder / "app")) as dep:
        dep.node_ids = {name: int(re.findall(r"SuperNode ID: (\d+)", dep.site_log(name))[-1]) for name in ("A", "B")}
        yield dep


def _overrides(dep, name: str, rounds: int, extra: str = "") -> str:
    return f"{BASE} federation.rounds={rounds} federation.run_name={name} federation.output_dir={dep.folder / 'runs'} {extra}"


def _registry(dep) -> Registry:
    return Registry(dep.folder / "runs" / "registry.sqlite")


def _wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@needs_flwr
def test_spoiled_updates_are_rejected_and_logged_and_the_round_goes_on(deployment):
    site_file = deployment.site_file("A")
    clean = site_file.read_text()
    site_file.write_text(yaml.safe_dump({**yaml.safe_load(clean), "faults": {"1": "nan", "2": "shape"}}))
    try:
        run = deployment.run(_overrides(deployment, "spoiled", rounds=2))
    finally:
        site_file.write_text(clean)
    assert run["status"] == "finished:completed", run["logs"]
    shown = _registry(deployment).describe("spoiled")
    assert [(r["round"], r["status"], r["sites_asked"], r["sites_accepted"]) for r in shown["rounds"]] == \
        [(1, "complete", 2, 1), (2, "complete", 2, 1)]
    assert [(r["round"], r["site"]) for r in shown["rejections"]] == [(1, "A"), (2, "A")]
    assert "NaN/Inf value(s)" in " ".join(shown["rejections"][0]["problems"])
    assert re.search(r"shape \(.*, 2\), expected", " ".join(shown["rejections"][1]["problems"]))
    assert {(m["round"], m["site"]) for m in shown["site_metrics"]} == {(1, "B"), (2, "B")}
    run_dir = deployment.folder / "runs" / "spoiled"
    for round_ in (1, 2):
        meta = json.loads((run_dir / "checkpoints" / f"round_{round_:04d}" / "meta.json").read_text())
        assert set(meta["sites"]) == {"B"}
        saved = load_file(run_dir / "checkpoints" / f"round_{round_:04d}" / "model.safetensors")
        assert all(np.isfinite(v).all() for v in saved.values() if np.issubdtype(v.dtype, np.floating))
    assert "update from site A rejected" in run["logs"]


def _rounds_done(registry: Registry, name: str) -> list[int]:
    try:
        return [r["round"] for r in registry.describe(name)["rounds"]]
    except KeyError:  # the ServerApp has not registered the run yet
        return []


@pytest.fixture(scope="module")
def crashes(deployment):
    """One 3-round run through both crashes, for the two tests below (a run each would cost a ServerApp start and
    two rounds more): site A is SIGKILLed while it trains round 1 and restarted at once, so round 1 goes on without
    it and A rejoins round 2; the coordinator is SIGKILLed once round 2 is complete, restarted on its database, and
    the run resumed for round 3. What each crash left behind is recorded as it is seen."""
    name, registry = "crashes", _registry(deployment)
    overrides = _overrides(deployment, name, rounds=3)
    log_start = len(deployment.site_log("A"))
    first_id = deployment.submit(overrides)
    seen = {"first_id": first_id}

    def training_round_1():  # A has received round 1 and started its ClientApp, and not replied yet
        log = deployment.site_log("A")[log_start:]
        marker = log.find(f"[RUN {first_id}, ROUND 1]")
        started = "ClientApp task started" in log[marker:] or "Start `flwr-clientapp` process" in log[marker:]
        return marker >= 0 and started and "Sent successfully" not in log[marker:]

    _wait_until(training_round_1, ROUND_TIMEOUT_S, "site A to start training round 1")
    seen["rounds_at_site_kill"] = [r["round"] for r in registry.describe(name)["rounds"]]
    deployment.kill_site("A")
    deployment.start_site("A")
    # The SuperLink takes A back once its old session's heartbeats have lapsed; that also ends A's part of round 1.
    seen["rejoined_node"] = deployment.wait_for_site("A")

    _wait_until(lambda: 2 in _rounds_done(registry, name), 3 * ROUND_TIMEOUT_S, "round 2 of the run to complete")
    deployment.kill_superlink()
    seen["rounds_at_coordinator_kill"] = _rounds_done(registry, name)
    checkpoints = deployment.folder / "runs" / name / "checkpoints"
    seen["sha"] = {r: hashlib.sha256((checkpoints / f"round_{r:04d}" / "model.safetensors").read_bytes()).hexdigest()
                   for r in (1, 2)}

    deployment.start_superlink()
    deployment.flwr("stop", first_id, "fedcxr-deployment", check=False)  # its ServerApp died with the SuperLink
    seen["resumed"] = deployment.run(overrides + " federation.resume=true", timeout_s=6 * ROUND_TIMEOUT_S)
    return seen


@needs_flwr
def test_site_killed_mid_round_is_left_out_and_rejoins_next_round(deployment, crashes):
    assert crashes["rounds_at_site_kill"] == []
    assert crashes["rejoined_node"] == deployment.node_ids["A"]
    run = crashes["resumed"]
    assert run["status"] == "finished:completed", run["logs"]
    shown = _registry(deployment).describe("crashes")
    # rounds 1 and 2 are the first Flower run's: A left out of round 1, back in round 2 of the same run (round 3,
    # after the coordinator's crash, is the other test's)
    assert [(r["round"], r["status"], r["sites_accepted"]) for r in shown["rounds"] if r["round"] <= 2] == \
        [(1, "complete", 1), (2, "complete", 2)]
    assert [(r["round"], r["node_id"]) for r in shown["rejections"] if r["round"] <= 2] == \
        [(1, str(deployment.node_ids["A"]))]
    assert {(m["round"], m["site"]) for m in shown["site_metrics"] if m["round"] <= 2} == {(1, "B"), (2, "A"), (2, "B")}


@needs_flwr
def test_coordinator_killed_mid_run_resumes_from_the_last_complete_round(deployment, crashes):
    assert crashes["rounds_at_coordinator_kill"] == [1, 2], \
        "the coordinator must be killed after round 2 and before round 3 completes"
    resumed = crashes["resumed"]
    assert resumed["status"] == "finished:completed", resumed["logs"]
    assert "resuming run crashes after its last complete round 2" in resumed["logs"]

    shown = _registry(deployment).describe("crashes")
    assert [(r["round"], r["status"]) for r in shown["rounds"]] == [(1, "complete"), (2, "complete"), (3, "complete")]
    assert [c["round"] for c in shown["checkpoints"]] == [1, 2, 3] and shown["run"]["status"] == "finished"
    checkpoints = deployment.folder / "runs" / "crashes" / "checkpoints"
    for round_, recorded in zip((1, 2), shown["checkpoints"]):  # the rounds before the crash are kept as they were
        model = checkpoints / f"round_{round_:04d}" / "model.safetensors"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == crashes["sha"][round_] == recorded["sha256"]
    metas = {r: json.loads((checkpoints / f"round_{r:04d}" / "meta.json").read_text()) for r in (1, 2, 3)}
    assert metas[1]["flwr_run_id"] == metas[2]["flwr_run_id"] == crashes["first_id"]
    assert metas[3]["flwr_run_id"] == resumed["run-id"] != crashes["first_id"]


def test_resume_refuses_a_truncated_checkpoint_and_uses_the_previous_round(tmp_path, caplog):
    from server.app import Federation
    from shared_models.config import compose

    cfg = compose(["federation.run_name=r", f"federation.output_dir={tmp_path}", "federation.resume=true"])
    federation = Federation(None, cfg)
    run_dir = tmp_path / "r"
    for round_ in (1, 2):
        save_round(run_dir, round_, {"w": np.full(3, round_, np.float32)}, {"fingerprints": federation.fingerprints})
    model_2 = run_dir / "checkpoints" / "round_0002" / "model.safetensors"
    model_2.write_bytes(model_2.read_bytes()[:-5])

    with caplog.at_level(logging.ERROR):
        start, params = federation._starting_point()
    assert start == 2 and params["w"].tolist() == [1.0, 1.0, 1.0]
    assert re.search(r"round_0002/model.safetensors has sha256 \w+…, but the recorded one is \w+…: the file is truncated or altered", caplog.text)
    assert not model_2.parent.exists(), "the damaged round is discarded so round 2 is trained again"
