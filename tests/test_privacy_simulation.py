"""`python -m simulations.run` with `privacy=dpsgd` and with `privacy=secagg`: 2 sites, 2 rounds, the real apps
under Flower's simulation runtime; what each site sent is read back from its `outgoing.jsonl`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.privacy import PrivacyLedger
from helpers.deployment import needs_flwr
from server.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_flwr

DP_PUBLIC = {"epsilon", "epsilon_total", "delta", "noise_multiplier", "sample_rate", "steps", "examples"}


def simulate(tmp: Path, privacy: str) -> Path:
    run_dir = tmp / "run"
    # concurrent_sites=1: one Ray actor runs both sites in turn; a second actor only adds a process importing
    # torch & co. at start-up, longer on 2 cores than a site's single step
    command = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}", f"cache_dir={tmp / 'cache'}",
               "data.studies=40", "federation.sites=2", "federation.rounds=2", "federation.local_steps=1",
               "train.batch_size=4", "label_fraction=[1.0]", "client_resources.num_cpus=1",
               "client_resources.concurrent_sites=1", "probe.max_iter=20", "compare_centralized=false",
               f"privacy={privacy}", "model=tiny_cnn",   # DP's GroupNorm needs tiny_cnn (simulate: tiny_cnn_half)
               "federation.strategy=fedavg"]   # SecAgg+ needs several updates per round (the default is cyclic)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return run_dir


def replies(run_dir: Path) -> dict[str, list[dict]]:
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run_dir / "sites").glob("*/outgoing.jsonl"))}


def completed_rounds(run_dir: Path) -> list:
    recorded = Registry(run_dir / "registry.sqlite").describe(run_dir.name)
    assert recorded["run"]["status"] == "finished"
    assert [r["status"] for r in recorded["rounds"]] == ["complete", "complete"]
    assert {(m["round"], m["site"]) for m in recorded["site_metrics"]} == {(r, s) for r in (1, 2)
                                                                           for s in ("site_0", "site_1")}
    return recorded["rounds"]


def test_dpsgd_simulation_completes_and_sites_send_only_shared_arrays_and_public_scalars(tmp_path):
    run_dir = simulate(tmp_path, "dpsgd")
    rounds = completed_rounds(run_dir)
    assert all(r["sites_accepted"] == 2 for r in rounds)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["epsilon"]) == {"site_0", "site_1"} and all(e > 0 for e in summary["epsilon"].values())
    for site, epsilon in summary["epsilon"].items():
        # each virtual site's ledger is its own, in this run's folder: not the phantom catalog every run shares
        ledger = PrivacyLedger(run_dir / "sites" / site / "ledger.sqlite", site)
        assert [row.round for row in ledger.rows()] == [1, 2] and {row.run_id for row in ledger.rows()} == {"run"}
        assert ledger.rows()[-1].epsilon_run == pytest.approx(epsilon)
        ledger.close()
    sent = replies(run_dir)
    assert set(sent) == {"site_0", "site_1"}
    for site, entries in sent.items():
        trained = [e for e in entries if e["type"] == "train"]
        assert len(trained) == 2 and all(e["error"] is None for e in trained)
        for entry in trained:
            assert set(entry["records"]) == {"arrays", "metrics", "site"}
            assert set(entry["records"]["metrics"]["values"]) <= DP_PUBLIC     # no loss, no timing, no count
            names = set(entry["records"]["arrays"]["arrays"])
            assert names and all(n.startswith(("image_encoder.", "text_encoder.", "image_projection.",
                                               "text_projection.", "image_token_projection.",
                                               "text_token_projection.")) for n in names)


def test_secagg_simulation_completes_and_no_array_leaves_a_site_unmasked(tmp_path):
    run_dir = simulate(tmp_path, "secagg")
    rounds = completed_rounds(run_dir)
    assert all(r["sites_accepted"] == 2 for r in rounds)
    sent = replies(run_dir)
    assert set(sent) == {"site_0", "site_1"}
    for site, entries in sent.items():
        assert len(entries) == 2 * 4 and all(e["error"] is None for e in entries)    # 4 SecAgg+ stages a round
        for entry in entries:
            for record in entry["records"].values():
                assert record.get("arrays", {}) == {}, "an array left the site in the clear"
        masked = [e["records"]["secaggplus_configs"]["values"]["masked_params"] for e in entries
                  if "masked_params" in e["records"].get("secaggplus_configs", {}).get("values", {})]
        assert len(masked) == 2                                                      # one masked vector a round
        metrics = [e["records"]["fitres.metrics"]["values"] for e in entries if "fitres.metrics" in e["records"]]
        assert [m["site"] for m in metrics] == [site, site]
        assert all(isinstance(v, (int, float)) for m in metrics for k, v in m.items() if k != "site")
    # the global model moved: the checkpoint of round 2 differs from round 1's
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*/model.safetensors"))
    assert len(checkpoints) == 2 and checkpoints[0].read_bytes() != checkpoints[1].read_bytes()
