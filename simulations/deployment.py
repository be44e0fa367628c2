"""A real deployment on 127.0.0.1 for tests and benchmarks: kits from `server.provision`, the TLS + node-auth
SuperLink their start script runs, nodes registered by their script, `client/run.py` sites, `flwr run`.

Every process is started here and stopped (or killed, to play a crash) by PID with everything below it.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from server.provision import provision
from simulations.flower import BIN, PROJECT_ROOT, descendants, free_port, stage_app, wait_until_listening

CONNECTION = "fedcxr-deployment"
ACTIVATED = "SuperNode ID: "  # what a SuperNode logs once the SuperLink has accepted it
PHANTOM_SITE_STUDIES = {"A": slice(0, 9), "B": slice(9, None)}  # unequal sizes, so FedAvg's weights differ


def phantom_site_fields(base: Path, studies: int = 30) -> dict[str, dict]:
    """Site-file entries (data, catalog, cache, studies) of sites A and B over one small 128-px phantom under
    `base`, generated and indexed on first use, split by training study.

    A file lock guards the first use: test workers and modules share one `base`."""
    from sqlalchemy import select

    from client.data.catalog import Study, open_catalog
    from client.data.index import index_data
    from client.data.layouts import open_layout
    from simulations.phantom import generate_phantom

    root, catalog, cache = base / "phantom", str(base / "catalog.sqlite"), base / "image_cache"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / ".indexed").is_file():
            if not (root / "ground_truth.json").is_file():
                generate_phantom(root, studies, seed=0, size=128)
            index_data(open_layout("mimic_cxr", root), catalog, cache, views=["PA", "AP"], short_side=128)
            (base / ".indexed").touch()
    db = open_catalog(catalog, readonly=True)
    try:
        with db.session() as session:
            train = sorted(session.scalars(select(Study.id).where(Study.split == "train", Study.report_status == "ok")))
    finally:
        db.close()
    return {name: {"data": {"root": str(root), "layout": "mimic_cxr", "split": "train", "index": False},
                   "catalog": catalog, "cache": str(cache), "studies": train[part], "scanner": None}
            for name, part in PHANTOM_SITE_STUDIES.items()}


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to `proc` and every process below it, children first (SuperExec starts its own session)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


def stop_tree(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM `proc` and its descendants, SIGKILL whatever is left after `grace_s`, reap `proc`."""
    pids = [*descendants(proc.pid), proc.pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _alive(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _alive(pids) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
        if not _alive(pids):
            break
    proc.wait()


class Deployment:
    """SuperLink (persistent `--database`) and sites in `folder`; `with Deployment(...) as dep:` stops them all."""

    def __init__(self, folder: Path, sites: list[str], app: Path | None = None, site_fields: dict | None = None,
                 database: bool = True, unregistered: list[str] = ()):
        self.folder = Path(folder)
        # A persistent database lets a restarted SuperLink keep its nodes and runs; in memory, its state has no
        # file lock to wait on (Flower's SQLite state waits 5 s for a lock, then answers 500).
        self.database = database
        self.names = list(sites)
        self.unregistered = list(unregistered)  # keys and site files, never registered with the SuperLink
        self.app = app or stage_app(self.folder / "app")
        self.site_fields = site_fields or {}
        self.port = free_port()
        self.kits = self.folder / "kits"
        self.coordinator = self.kits / "coordinator"
        # The SuperExec asks the SuperLink for a ServerApp to start every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s for the
        # deployment's whole life: at 0.1 s that is a steady load on both processes (a 2-core machine's sites train
        # slower for it) to start each run under a second sooner. Flower's default, 1 s, is kept.
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_HOME=str(self.coordinator / "flwr-home"), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="1",
                        FEDCXR_STATE=str(self.folder),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        # Every round's ClientApp and every run's ServerApp imports the installed app bundle afresh: let the first
        # one leave its bytecode there for the rest instead of each compiling the project's sources again.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.superlink: subprocess.Popen | None = None
        self.superexec: tuple[int, list[str]] | None = None  # the SuperLink's SuperExec: PID, command line
        self.revived: list[subprocess.Popen] = []           # SuperExecs started again here (see revive_superexec)
        self.sites: dict[str, subprocess.Popen] = {}
        self.site_files: dict[str, Path] = {}
        self._activations: dict[str, int] = {}

    def __enter__(self) -> "Deployment":
        provision(CONNECTION, f"127.0.0.1:{self.port}", [*self.names, *self.unregistered], self.kits)
        try:
            self.start_superlink()
            registered = subprocess.run(["sh", str(self.coordinator / "register_nodes.sh"), *self.names], env=self.env,
                                        cwd=self.folder, capture_output=True, text=True, timeout=300)
            if registered.returncode:
                raise RuntimeError(f"register_nodes.sh failed:\n{registered.stdout}\n{registered.stderr}")
            for name in self.names:
                self.start_site(name)
            for name in self.names:
                self.wait_for_site(name)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, command: list[str], log_name: str) -> subprocess.Popen:
        with open(self.folder / f"{log_name}.log", "a") as log:
            return subprocess.Popen(command, env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)

    def start_superlink(self, timeout_s: float = 120) -> None:
        """Start (or restart, on the same port and database) the SuperLink and wait until it listens."""
        # The kit's script runs flower-superlink (exec: same PID) with its database in FEDCXR_STATE = this folder.
        self.superlink = self._start(["sh", str(self.coordinator / "start_superlink.sh"),
                                      *([] if self.database else ["--database", ":flwr-in-memory:"])], "superlink")
        wait_until_listening(self.superlink, self.port, self.folder / "superlink.log", timeout_s)
        self.superexec = None

    def revive_superexec(self) -> None:
        """Start the SuperLink's SuperExec again, with its own command line, if it has died under a living SuperLink.

        The SuperLink starts one SuperExec, which starts every ServerApp, and never restarts it. On a loaded machine
        the SuperLink's SQLite state sometimes answers "database is locked" (a 5 s lock timeout) to its
        AcquireTask, and the SuperExec exits on that error: every later run would wait for a ServerApp forever."""
        if self.superlink is None or self.superlink.poll() is not None:
            return
        if self.superexec is None or not _alive([self.superexec[0]]):
            for pid in descendants(self.superlink.pid) + [p.pid for p in self.revived]:
                try:
                    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
                except OSError:
                    continue
                if _alive([pid]) and any(Path(a).name == "flower-superexec" for a in argv[:2]):
                    self.superexec = (pid, argv)
                    return
        if self.superexec is not None and not _alive([self.superexec[0]]):
            with open(self.folder / "superlink.log", "a") as log:
                log.write(f"fedcxr deployment: the SuperExec (PID {self.superexec[0]}) exited; starting it again\n")
            revived = self._start(self.superexec[1], "superexec")
            self.revived.append(revived)
            self.superexec = (revived.pid, self.superexec[1])

    def site_file(self, name: str) -> Path:
        """Write site `name`'s file (once) and return its path."""
        if name not in self.site_files:
            data = self.folder / f"data_{name}"
            data.mkdir(parents=True, exist_ok=True)
            site = {**yaml.safe_load((self.kits / "sites" / name / "site.yaml").read_text()),  # the kit's file
                    "data": {"root": str(data), "layout": "manifest", "index": False},
                    "state_dir": str(self.folder / f"state_{name}"), "supernode_port": free_port(), "device": "cpu",
                    "threads": 1, "policy": {"require": []}, **self.site_fields.get(name, {})}  # policy: accept the tests' runs
            path = self.folder / "sites" / f"{name}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(site))
            self.site_files[name] = path
        return self.site_files[name]

    def start_site(self, name: str) -> None:
        log = self.folder / f"site_{name}.log"
        self._activations[name] = log.read_text(errors="replace").count(ACTIVATED) if log.exists() else 0
        self.sites[name] = self._start([sys.executable, str(PROJECT_ROOT / "client" / "run.py"), "--site",
                                        str(self.site_file(name))], f"site_{name}")

    def wait_for_site(self, name: str, timeout_s: float = 180) -> int:
        """Wait until the site started last by `start_site` has connected; its node id."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.site_log(name)
            if log.count(ACTIVATED) > self._activations[name]:
                return int(log.rsplit(ACTIVATED, 1)[1].split()[0])
            if self.sites[name].poll() is not None:
                raise RuntimeError(f"site {name} exited with {self.sites[name].returncode}:\n{log[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"site {name} did not connect within {timeout_s} s; see {self.folder / f'site_{name}.log'}")

    def kill_site(self, name: str) -> None:
        """A crash: SIGKILL the site's SuperNode and the apps it runs."""
        signal_tree(self.sites[name], signal.SIGKILL)
        self.sites[name].wait()

    def kill_superlink(self) -> None:
        """A coordinator crash: SIGKILL the SuperLink, its SuperExec and the running ServerApp."""
        signal_tree(self.superlink, signal.SIGKILL)
        self.superlink.wait()

    def stop(self) -> None:
        for proc in [*self.sites.values(), self.superlink, *self.revived]:
            if proc is not None:
                stop_tree(proc)
        for pid in self._strays():  # an app whose SuperExec died is re-parented to init: find it by its address
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _strays(self) -> list[int]:
        """PIDs of this user's processes still talking to this deployment's SuperLink or SuperNodes."""
        ports = [self.port] + [int(yaml.safe_load(f.read_text())["supernode_port"]) for f in self.site_files.values()]
        addresses = [f"127.0.0.1:{port}".encode() for port in ports]
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.stat().st_uid == os.getuid() and any(a in cmdline.read_bytes() for a in addresses):
                    found.append(int(cmdline.parent.name))
            except OSError:
                continue
        return [pid for pid in found if pid != os.getpid()]

    def site_log(self, name: str) -> str:
        return (self.folder / f"site_{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, check: bool = True, timeout_s: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout_s)
        if check and done.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def submit(self, overrides: str) -> str:
        """`flwr run` the app with these Hydra overrides; returns Flower's run id."""
        self.revive_superexec()
        done = self.flwr("run", str(self.app), CONNECTION, "--run-config", f"overrides={json.dumps(overrides)}",
                         "--format", "json")
        return str(json.loads(done.stdout)["run-id"])

    def listed(self, run_id: str, attempts: int = 5) -> dict:
        """Flower's record of the run. On a loaded machine the SuperLink's SQLite state sometimes answers
        "database is locked" (flwr prints success: false and exits 0): asked again a few times."""
        for attempt in range(attempts):
            answer = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout)
            if answer.get("runs"):
                return answer["runs"][0]
            time.sleep(2)
        raise RuntimeError(f"flwr ls {run_id} failed {attempts} times; last answer: {answer}")

    def status(self, run_id: str) -> str:
        return self.listed(run_id)["status"]

    def wait(self, run_id: str, timeout_s: float = 900, overrides: str = "") -> dict:
        """Wait until Flower records the run as finished; its record, with the ServerApp's log under "logs".

        Each `flwr ls` is a CLI process start (1.5 s of CPU, taken from the run's own processes on a small
        machine): when `overrides` name the run's registry (federation.output_dir, federation.run_name), Flower is
        asked once the registry records the run's end, and every 60 s regardless, in case the ServerApp died
        before recording anything; without them, every 2 s."""
        deadline, asked = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            self.revive_superexec()
            ended = _recorded_end(overrides, run_id)
            if ended or time.monotonic() - asked > (2 if ended is None else 60):
                asked = time.monotonic()
                listed = self.listed(run_id)
                if listed["status"].startswith("finished"):
                    listed["logs"] = self.flwr("log", run_id, CONNECTION, "--show", check=False).stdout
                    return listed
            time.sleep(0.5)
        raise TimeoutError(f"Flower run {run_id} did not finish within {timeout_s} s")

    def run(self, overrides: str, timeout_s: float = 900) -> dict:
        return self.wait(self.submit(overrides), timeout_s, overrides)


def _recorded_end(overrides: str, run_id: str) -> bool | None:
    """Whether the run registry named in `overrides` records this Flower run as no longer running (None: no
    registry named)."""
    options = dict(item.split("=", 1) for item in overrides.split() if "=" in item)
    name, output_dir = options.get("federation.run_name"), options.get("federation.output_dir")
    if not name or not output_dir:
        return None
    if not (Path(output_dir) / "registry.sqlite").is_file():
        return False
    from server.registry import Registry

    try:
        run = Registry(Path(output_dir) / "registry.sqlite").describe(name)["run"]
    except KeyError:
        return False
    return str(run["flwr_run_id"]) == str(run_id) and run["status"] != "running"
