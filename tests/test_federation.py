"""End-to-end deployment on 127.0.0.1: a TLS + node-auth SuperLink, two `client/run.py` sites, `flwr run`, resume."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from client.federated import shared_arrays, train_round
from server.aggregation import weighted_mean
from server.registry import Registry
from server.rounds import round_config
from shared_models.checkpoint import checkpoint_fingerprints, load_checkpoint
from shared_models.config import compose
from shared_models.factory import create_model
from shared_models.sharing import shared_parameter_names, sharing_settings
from simulations.deployment import Deployment
from simulations.flower import PROJECT_ROOT, descendants, free_port

from helpers.deployment import deploy, needs_flwr, phantom_sites

# poll_s: how often the ServerApp asks the SuperLink for replies; each ask costs both processes CPU that the sites
# training the round need more (the config's default is 0.5 s)
OVERRIDES = "federation.local_steps=2 train.batch_size=4 federation.poll_s=0.5 federation.min_sites=2"
pytestmark = needs_flwr


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    # C has a key and a site file, and is never registered
    site_c = dict(phantom_sites(tmp_path_factory)["A"], max_retries=1, restart_delays_s=[0.5])
    with deploy(tmp_path_factory, "federation", extra_sites={"C": site_c}, unregistered=["C"], database=False) as dep:
        yield dep


def site_config(deployment: Deployment, name: str) -> dict:
    return yaml.safe_load(deployment.site_file(name).read_text())


# Another local process at site A, without the site's SuperExec secret, asks the SuperNode's runtime API for
# ClientApp tasks all through the first run: one JSON line per answer.
THIEF = """
import json, sys, time
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
client = RuntimeHttpClient.from_server_address(server_address=sys.argv[1], insecure=True, root_certificates=None,
    interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
while True:
    try:
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        print(json.dumps({"task": reply.HasField("task") and bool(reply.token), "error": None}), flush=True)
    except Exception as err:
        print(json.dumps({"task": False, "error": str(err)}), flush=True)
    time.sleep(1.0)
"""


@pytest.fixture(scope="module")
def first_run(deployment):
    overrides = f"{OVERRIDES} federation.rounds=2 federation.run_name=e2e federation.output_dir={deployment.folder / 'runs'}"
    thief_log = deployment.folder / "thief.jsonl"
    with open(thief_log, "w") as out:
        thief = subprocess.Popen([sys.executable, "-c", THIEF, f"127.0.0.1:{site_config(deployment, 'A')['supernode_port']}"],
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        run = deployment.run(overrides)
        run["wall_s"] = time.monotonic() - started
    finally:
        thief.send_signal(signal.SIGTERM)
        thief.wait(timeout=30)
    run["overrides"] = overrides
    run["thief"] = [json.loads(line) for line in thief_log.read_text().splitlines() if line.startswith("{")]
    return run


def test_runtime_api_refuses_a_local_process_without_the_site_secret(deployment, first_run):
    assert first_run["status"] == "finished:completed", first_run["logs"]
    asked = first_run["thief"]
    assert len(asked) >= 5, (deployment.folder / "thief.jsonl").read_text()
    assert not any(a["task"] for a in asked)
    assert all("401 Unauthorized" in (a["error"] or "") for a in asked), asked[:3]
    # ... while the site's own ClientApp, started by its launcher with the secret, trained both rounds.
    entries = (Path(site_config(deployment, "A")["state_dir"]) / "outgoing.jsonl").read_text().splitlines()
    assert [json.loads(e)["type"] for e in entries][:2] == ["train", "train"]


def test_run_finishes_with_a_checkpoint_per_round(deployment, first_run):
    assert first_run["status"] == "finished:completed", first_run["logs"]
    run_dir = deployment.folder / "runs" / "e2e"
    for round_ in (1, 2):
        meta = json.loads((run_dir / "checkpoints" / f"round_{round_:04d}" / "meta.json").read_text())
        assert meta["round"] == round_ and set(meta["sites"]) == {"A", "B"}
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["round"] == 2
    shown = Registry(deployment.folder / "runs" / "registry.sqlite").describe("e2e")
    assert shown["run"]["status"] == "finished"
    assert [r["round"] for r in shown["rounds"]] == [1, 2] and shown["rejections"] == []
    assert {(m["round"], m["site"]) for m in shown["site_metrics"]} == {(1, "A"), (1, "B"), (2, "A"), (2, "B")}


def test_checkpoints_load_as_models_and_the_final_model_is_exported(deployment, first_run):
    assert first_run["status"] == "finished:completed"
    run_dir = deployment.folder / "runs" / "e2e"
    model, meta = load_checkpoint(run_dir / "checkpoints" / "round_0002")
    saved = load_file(run_dir / "checkpoints" / "round_0002" / "model.safetensors")
    assert set(meta["shared"]) == set(saved) == set(shared_parameter_names(model, **sharing_settings(meta["config"])))
    state = model.state_dict()
    for name, value in saved.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    exported = run_dir / "export"
    assert (exported / "image" / "model.safetensors").is_file() and (exported / "text" / "config.json").is_file()


def test_aggregate_is_the_example_weighted_mean_of_the_sites(deployment, first_run, tmp_path):
    assert first_run["status"] == "finished:completed"
    cfg = compose(first_run["overrides"].split())
    model = create_model(cfg, seed=int(cfg.seed))
    prints, start = checkpoint_fingerprints(cfg, model.tokenizer), shared_arrays(model, cfg)
    updates = []
    for name in ("A", "B"):  # redo round 1 of each site from the same seeded start, on fresh local state
        site = dict(site_config(deployment, name), state_dir=str(tmp_path / name))
        params, examples, _ = train_round(start, round_config(cfg, 1, "e2e", prints), site, "e2e", cfg)
        updates.append((params, examples))
    assert updates[0][1] != updates[1][1], "the sites should hold different numbers of examples"
    expected = weighted_mean(updates)
    saved = load_file(deployment.folder / "runs" / "e2e" / "checkpoints" / "round_0001" / "model.safetensors")
    assert set(saved) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_only_shared_parameters_and_scalars_leave_a_site(deployment, first_run):
    assert first_run["status"] == "finished:completed"
    cfg = compose(first_run["overrides"].split())
    shared = set(shared_parameter_names(create_model(cfg, seed=int(cfg.seed)), **sharing_settings(cfg)))
    for name in ("A", "B"):
        state = Path(site_config(deployment, name)["state_dir"])
        local_only = set(load_file(state / "runs" / "e2e" / "local.safetensors"))
        assert local_only and not local_only & shared
        assert any(k.startswith("objectives.") for k in local_only)  # decoders, tag decoder, pseudo-seg head
        entries = [json.loads(line) for line in (state / "outgoing.jsonl").read_text().splitlines()]
        assert [e["type"] for e in entries] == ["train", "train"]
        for entry in entries:
            assert entry["error"] is None and set(entry["records"]) == {"arrays", "metrics", "site"}
            assert set(entry["records"]["arrays"]["arrays"]) == shared
            metrics = entry["records"]["metrics"]["values"]
            assert {"loss", "examples", "seconds"} <= set(metrics)
            assert all(isinstance(value, (int, float)) for value in metrics.values()), metrics
            assert entry["records"]["site"]["values"] == {"name": name}


def test_unregistered_node_is_refused_at_once(deployment):
    started = time.monotonic()
    deployment.start_site("C")
    returncode = deployment.sites["C"].wait(timeout=120)
    elapsed = time.monotonic() - started
    log = deployment.site_log("C")
    # client/run.py's own check asks the SuperLink before the SuperNode starts: no retries, the fix in one line
    assert returncode == 2 and elapsed < 10, (elapsed, log)
    assert "does not know this site's node key" in log and "register_nodes.sh C" in log, log
    assert "restarting" not in log and "starting the SuperNode" not in log, log


def test_client_run_explains_missing_files_and_unreachable_superlink(deployment, tmp_path):
    site = dict(site_config(deployment, "A"), node_private_key=str(tmp_path / "nope"))
    (tmp_path / "X.yaml").write_text(yaml.safe_dump(site))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "client" / "run.py"), "--site", str(tmp_path / "X.yaml")],
                          capture_output=True, text=True, env=deployment.env, timeout=120)
    assert done.returncode == 2 and "node_private_key" in done.stderr and "does not exist" in done.stderr
    site = dict(site_config(deployment, "A"), superlink=f"127.0.0.1:{free_port()}")
    (tmp_path / "Y.yaml").write_text(yaml.safe_dump(site))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "client" / "run.py"), "--site", str(tmp_path / "Y.yaml")],
                          capture_output=True, text=True, env=deployment.env, timeout=120)
    assert done.returncode == 2 and "unreachable" in done.stderr


@pytest.fixture(scope="module")
def resumed_run(deployment, first_run):
    """Run e2e resumed for a third round, with `nproc: 2` in site A's file for that round: A's ClientApp trains it on
    a worker group of 2 processes (client.distributed.run). The spawned workers seen below A's `client/run.py`
    meanwhile are recorded under "workers"; the file is put back afterwards (the other tests' rounds use 1)."""
    site_file = deployment.site_file("A")
    clean = site_file.read_text()
    site_file.write_text(yaml.safe_dump({**yaml.safe_load(clean), "nproc": 2}))
    workers, finished = set(), threading.Event()

    def watch_site_a():  # a spawned worker runs `python -c "from multiprocessing.spawn import spawn_main; ..."`
        while not finished.is_set():
            for pid in descendants(deployment.sites["A"].pid):
                try:
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        workers.add(pid)
                except OSError:
                    pass
            finished.wait(0.5)

    watcher = threading.Thread(target=watch_site_a, daemon=True)
    watcher.start()
    overrides = first_run["overrides"].replace("federation.rounds=2", "federation.rounds=3") + " federation.resume=true"
    try:
        run = deployment.run(overrides)
    finally:
        finished.set()
        watcher.join(timeout=30)
        site_file.write_text(clean)
    run["workers"] = workers
    return run


def test_resume_continues_at_the_next_round(deployment, first_run, resumed_run):
    assert first_run["status"] == "finished:completed"
    resumed = resumed_run
    assert resumed["status"] == "finished:completed", resumed["logs"]
    run_dir = deployment.folder / "runs" / "e2e"
    metas = {r: json.loads((run_dir / "checkpoints" / f"round_{r:04d}" / "meta.json").read_text()) for r in (1, 2, 3)}
    assert metas[2]["flwr_run_id"] == first_run["run-id"] and metas[3]["flwr_run_id"] == resumed["run-id"]
    rounds = [r["round"] for r in Registry(deployment.folder / "runs" / "registry.sqlite").describe("e2e")["rounds"]]
    assert rounds == [1, 2, 3]
    assert "resuming run e2e after its last complete round 2" in resumed["logs"]


def test_a_site_with_nproc_2_trains_its_round_on_two_processes_and_the_update_is_accepted(deployment, resumed_run):
    """`python client/run.py --site A` with `nproc: 2` in A's site file (docs/scale.md, "With Flower")."""
    assert resumed_run["status"] == "finished:completed", resumed_run["logs"]
    assert len(resumed_run["workers"]) == 2, (resumed_run["workers"], deployment.site_log("A")[-3000:])
    shown = Registry(deployment.folder / "runs" / "registry.sqlite").describe("e2e")
    assert [(r["round"], r["sites_asked"], r["sites_accepted"]) for r in shown["rounds"]][-1] == (3, 2, 2)
    assert shown["rejections"] == [] and (3, "A") in {(m["round"], m["site"]) for m in shown["site_metrics"]}
    outgoing = Path(site_config(deployment, "A")["state_dir"]) / "outgoing.jsonl"
    entry = json.loads(outgoing.read_text().splitlines()[-1])
    assert entry["type"] == "train" and entry["error"] is None   # rank 0's reply, as a 1-process round's
    assert entry["records"]["metrics"]["values"]["steps"] == 2.0
    assert "nproc" not in site_config(deployment, "A"), "the other rounds train on one process"


def test_secagg_round_in_deployment_leaves_the_sites_only_masked(deployment):
    # Each of SecAgg+'s four messages starts a ClientApp process: the protocol's state must survive between them.
    overrides = (f"{OVERRIDES} federation.rounds=1 federation.run_name=secagg privacy=secagg "
                 f"federation.output_dir={deployment.folder / 'runs'}")
    run = deployment.run(overrides)
    assert run["status"] == "finished:completed", run["logs"]
    shown = Registry(deployment.folder / "runs" / "registry.sqlite").describe("secagg")
    assert [r["status"] for r in shown["rounds"]] == ["complete"] and shown["rejections"] == []
    assert {m["site"] for m in shown["site_metrics"]} == {"A", "B"}
    for name in ("A", "B"):
        state = Path(site_config(deployment, name)["state_dir"])
        entries = [json.loads(line) for line in (state / "outgoing.jsonl").read_text().splitlines()]
        secure = [e for e in entries if "secaggplus_configs" in e["records"]]
        assert len(secure) == 4 and all(e["error"] is None for e in secure)
        assert all(r.get("arrays", {}) == {} for e in secure for r in e["records"].values())
        assert sum("masked_params" in e["records"]["secaggplus_configs"]["values"] for e in secure) == 1


def test_cyclic_passes_the_model_from_site_to_site(deployment, tmp_path):
    overrides = (f"{OVERRIDES} federation.rounds=2 federation.run_name=cyclic federation.strategy=cyclic "
                 f"federation.output_dir={deployment.folder / 'runs'}")
    run = deployment.run(overrides)
    assert run["status"] == "finished:completed", run["logs"]
    shown = Registry(deployment.folder / "runs" / "registry.sqlite").describe("cyclic")
    assert [(r["status"], r["sites_asked"], r["sites_accepted"]) for r in shown["rounds"]] == [("complete", 1, 1)] * 2
    first, second = (m["site"] for m in shown["site_metrics"])
    assert {first, second} == {"A", "B"}, "each round asks the other site"
    # Round 1's model is the first site's own update from the seeded start, not a mean with the other's.
    cfg = compose(overrides.split())
    model = create_model(cfg, seed=int(cfg.seed))
    site = dict(site_config(deployment, first), state_dir=str(tmp_path / first))
    expected, _, _ = train_round(shared_arrays(model, cfg), round_config(cfg, 1, "cyclic",
                                 checkpoint_fingerprints(cfg, model.tokenizer)), site, "cyclic", cfg)
    saved = load_file(deployment.folder / "runs" / "cyclic" / "checkpoints" / "round_0001" / "model.safetensors")
    for name, value in expected.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
