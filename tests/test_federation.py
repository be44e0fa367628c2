"""End-to-end deployment on 127.0.0.1: a TLS + node-auth SuperLink, two `client/run.py` sites, `flwr run`, resume."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.numpy import load_file

from client.federated import build_model, shared_arrays, train_round
from server.aggregation import weighted_mean
from server.registry import Registry
from server.rounds import round_config
from shared_models.checkpoint import checkpoint_fingerprints, load_checkpoint
from shared_models.config import compose
from shared_models.sharing import shared_parameter_names, sharing_settings
from tests.phantom_sites import phantom_sites

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedcxr-test"
OVERRIDES = "federation.local_steps=2 federation.batch_size=4 federation.poll_s=0.1 federation.min_sites=2"
pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flwr's entry points are not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_pki(folder: Path, sites: list[str]) -> None:
    """A CA, a SuperLink certificate for 127.0.0.1 signed by it, and one EC node key pair per site."""
    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    now = datetime.now(timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedcxr test CA")).issuer_name(name("fedcxr test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    import ipaddress

    server = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(pem(server_key))
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"node_{site}").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (folder / f"node_{site}").chmod(0o600)
        (folder / f"node_{site}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def stage_app(target: Path) -> Path:
    """Only the app's files: `flwr run` walks the whole folder it is given (a .venv inside costs ~20 s)."""
    target.mkdir()
    shutil.copy(ROOT / "pyproject.toml", target)
    for package in ("client", "server", "shared_models", "configs"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@dataclass
class Deployment:
    tmp: Path
    app: Path
    env: dict
    sites: dict = field(default_factory=dict)
    processes: list = field(default_factory=list)

    def flwr(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.tmp, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode:
            raise AssertionError(f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def start(self, command: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{log_name}.log", "w")
        proc = subprocess.Popen(command, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def run(self, overrides: str, timeout_s: float = 900) -> dict:
        """`flwr run` the staged app, then wait on the run's status (the exit code alone says nothing)."""
        done = self.flwr("run", str(self.app), CONNECTION, "--run-config", f"overrides='{overrides}'", "--format", "json")
        run_id = json.loads(done.stdout)["run-id"]
        deadline, asked = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            # Each `flwr ls` is a CLI process start (seconds of CPU): ask it when the registry says the run
            # ended, and now and then in case the ServerApp died before recording anything.
            if _recorded_end(overrides, run_id) or time.monotonic() - asked > 20:
                asked = time.monotonic()
                listed = json.loads(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
                run = listed["runs"][0]
                if run["status"].startswith("finished"):
                    run["logs"] = self.flwr("log", str(run_id), CONNECTION, "--show", check=False).stdout
                    return run
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} did not finish within {timeout_s} s")


def _recorded_end(overrides: str, run_id: int) -> bool:
    """Whether the run registry named in `overrides` has this Flower run as finished or failed."""
    options = dict(item.split("=", 1) for item in overrides.split() if "=" in item)
    name, output_dir = options.get("federation.run_name"), options.get("federation.output_dir")
    if not name or not output_dir or not (Path(output_dir) / "registry.sqlite").is_file():
        return False
    try:
        run = Registry(Path(output_dir) / "registry.sqlite").describe(name)["run"]
    except KeyError:
        return False
    return str(run["flwr_run_id"]) == str(run_id) and run["status"] != "running"


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (SuperLink/SuperNode start SuperExec, which starts the apps)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def stop(processes: list[subprocess.Popen]) -> None:
    """Terminate each process and everything it started, by PID; kill what is left after 15 s."""
    pids = [pid for proc in processes if proc.poll() is None for pid in descendants(proc.pid)]
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s:\n{log.read_text()}")


def _write_site(dep: Deployment, name: str, link_port: int, data: dict, **extra) -> Path:
    site = {"name": name, **data,
            "state_dir": str(dep.tmp / f"state_{name}"), "superlink": f"127.0.0.1:{link_port}",
            "root_certificates": str(dep.tmp / "pki" / "ca.crt"), "node_private_key": str(dep.tmp / "pki" / f"node_{name}"),
            "supernode_port": free_port(), "device": "cpu", "threads": 1,
            "privacy": {"max_epsilon": 8.0, "max_delta": 1e-5}, **extra}
    path = dep.tmp / "sites" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(site))
    dep.sites[name] = site
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federation")
    (tmp / "pki").mkdir()
    write_pki(tmp / "pki", ["A", "B", "C"])
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp / "cli-home"),
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    dep = Deployment(tmp, stage_app(tmp / "app"), env)
    data = phantom_sites(tmp_path_factory.getbasetemp() / "federation_phantom")
    port = free_port()
    (tmp / "cli-home").mkdir()
    (tmp / "cli-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tmp / "pki" / "ca.crt"}"\n')
    try:
        link = dep.start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tmp / "pki" / "ca.crt"),
                          "--ssl-certfile", str(tmp / "pki" / "server.pem"), "--ssl-keyfile", str(tmp / "pki" / "server.key"),
                          "--enable-supernode-auth", "--database", str(tmp / "superlink.db"), "--port", str(port),
                          "--disable-runtime-dependency-installation"], "superlink")
        _wait_for_port(port, link, tmp / "superlink.log")
        for name in ("A", "B"):
            dep.flwr("supernode", "register", str(tmp / "pki" / f"node_{name}.pub"), CONNECTION)
            dep.start([sys.executable, str(ROOT / "client" / "run.py"), "--site", str(_write_site(dep, name, port, data[name]))],
                      f"site_{name}")
        _write_site(dep, "C", port, data["A"], max_retries=1)  # its key is never registered
        dep.port = port
        yield dep
    finally:
        stop(dep.processes)


@pytest.fixture(scope="module")
def first_run(deployment):
    overrides = f"{OVERRIDES} federation.rounds=2 federation.run_name=e2e federation.output_dir={deployment.tmp / 'runs'}"
    started = time.monotonic()
    run = deployment.run(overrides)
    run["wall_s"] = time.monotonic() - started
    run["overrides"] = overrides
    return run


def test_run_finishes_with_a_checkpoint_per_round(deployment, first_run):
    assert first_run["status"] == "finished:completed", first_run["logs"]
    run_dir = deployment.tmp / "runs" / "e2e"
    for round_ in (1, 2):
        meta = json.loads((run_dir / "checkpoints" / f"round_{round_:04d}" / "meta.json").read_text())
        assert meta["round"] == round_ and set(meta["sites"]) == {"A", "B"}
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["round"] == 2
    shown = Registry(deployment.tmp / "runs" / "registry.sqlite").describe("e2e")
    assert shown["run"]["status"] == "finished"
    assert [r["round"] for r in shown["rounds"]] == [1, 2] and shown["rejections"] == []
    assert {(m["round"], m["site"]) for m in shown["site_metrics"]} == {(1, "A"), (1, "B"), (2, "A"), (2, "B")}


def test_checkpoints_load_as_models_and_the_final_model_is_exported(deployment, first_run):
    assert first_run["status"] == "finished:completed"
    run_dir = deployment.tmp / "runs" / "e2e"
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
    model = build_model(cfg)
    prints, start = checkpoint_fingerprints(cfg, model.tokenizer), shared_arrays(model, cfg)
    updates = []
    for name in ("A", "B"):  # redo round 1 of each site from the same seeded start, on fresh local state
        site = dict(deployment.sites[name], state_dir=str(tmp_path / name))
        params, examples, _ = train_round(start, round_config(cfg, 1, "e2e", prints), site, "e2e", cfg)
        updates.append((params, examples))
    assert updates[0][1] != updates[1][1], "the sites should hold different numbers of examples"
    expected = weighted_mean(updates)
    saved = load_file(deployment.tmp / "runs" / "e2e" / "checkpoints" / "round_0001" / "model.safetensors")
    assert set(saved) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_only_shared_parameters_and_scalars_leave_a_site(deployment, first_run):
    assert first_run["status"] == "finished:completed"
    cfg = compose(first_run["overrides"].split())
    shared = set(shared_parameter_names(build_model(cfg), **sharing_settings(cfg)))
    for name in ("A", "B"):
        state = Path(deployment.sites[name]["state_dir"])
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


def test_unregistered_node_is_refused(deployment):
    proc = deployment.start([sys.executable, str(ROOT / "client" / "run.py"), "--site",
                             str(deployment.tmp / "sites" / "C.yaml")], "site_C")
    returncode = proc.wait(timeout=120)
    log = (deployment.tmp / "site_C.log").read_text()
    assert returncode != 0 and "Failed to activate SuperNode" in log, log


def test_client_run_explains_missing_files_and_unreachable_superlink(deployment, tmp_path):
    site = dict(deployment.sites["A"], node_private_key=str(tmp_path / "nope"))
    (tmp_path / "X.yaml").write_text(yaml.safe_dump(site))
    done = subprocess.run([sys.executable, str(ROOT / "client" / "run.py"), "--site", str(tmp_path / "X.yaml")],
                          capture_output=True, text=True, env=deployment.env, timeout=120)
    assert done.returncode == 2 and "node_private_key" in done.stderr and "does not exist" in done.stderr
    site = dict(deployment.sites["A"], superlink=f"127.0.0.1:{free_port()}")
    (tmp_path / "Y.yaml").write_text(yaml.safe_dump(site))
    done = subprocess.run([sys.executable, str(ROOT / "client" / "run.py"), "--site", str(tmp_path / "Y.yaml")],
                          capture_output=True, text=True, env=deployment.env, timeout=120)
    assert done.returncode == 2 and "unreachable" in done.stderr


def test_resume_continues_at_the_next_round(deployment, first_run):
    assert first_run["status"] == "finished:completed"
    overrides = first_run["overrides"].replace("federation.rounds=2", "federation.rounds=3") + " federation.resume=true"
    resumed = deployment.run(overrides)
    assert resumed["status"] == "finished:completed", resumed["logs"]
    run_dir = deployment.tmp / "runs" / "e2e"
    metas = {r: json.loads((run_dir / "checkpoints" / f"round_{r:04d}" / "meta.json").read_text()) for r in (1, 2, 3)}
    assert metas[2]["flwr_run_id"] == first_run["run-id"] and metas[3]["flwr_run_id"] == resumed["run-id"]
    rounds = [r["round"] for r in Registry(deployment.tmp / "runs" / "registry.sqlite").describe("e2e")["rounds"]]
    assert rounds == [1, 2, 3]
    assert "resuming run e2e after its last complete round 2" in resumed["logs"]
