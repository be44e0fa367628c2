"""Run the deployment's ServerApp and ClientApp under Flower's simulation runtime: local SuperLink, `flwr run`, stop."""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_PARTS = ("client", "server", "shared_models", "configs")   # what the app bundle holds (pyproject fab-include)
BIN = Path(sys.executable).parent
CONNECTION = "fedcxr-simulation"


@dataclass(frozen=True)
class ClientResources:
    """What Ray gives each virtual site; sites beyond what fits wait their turn.

    `concurrent_sites`: how many sites train at once. Ray hands out whole CPUs, so to run 3 one-thread sites
    at once on 2 cores it is told the machine has 3 (`init-args-num-cpus`); the OS then time-shares the cores.
    None: Ray counts the machine's own cores."""

    num_cpus: int
    num_gpus: float
    concurrent_sites: int | None = None

    @classmethod
    def from_machine(cls, num_cpus: int | None = None, num_gpus: float | None = None,
                     concurrent_sites: int | None = None) -> "ClientResources":
        """One site per GPU at a time where there are GPUs; on CPU one site at a time with every core unless
        `num_cpus` / `concurrent_sites` say otherwise."""
        import torch

        gpus = torch.cuda.device_count()
        cpus = os.cpu_count() or 1
        if num_gpus is None:
            num_gpus = 1.0 if gpus else 0.0
        if num_cpus is None:
            num_cpus = max(1, cpus // max(1, gpus))
        if concurrent_sites is not None and int(concurrent_sites) < 1:
            raise ValueError(f"client_resources.concurrent_sites must be at least 1, got {concurrent_sites}")
        return cls(int(num_cpus), float(num_gpus), None if concurrent_sites is None else int(concurrent_sites))

    def federation_config(self, sites: int) -> str:
        """`flwr run --federation-config` for `sites` virtual SuperNodes with these resources."""
        config = (f"num-supernodes={sites} client-resources-num-cpus={self.num_cpus} "
                  f"client-resources-num-gpus={self.num_gpus}")
        if self.concurrent_sites is not None:
            config += f" init-args-num-cpus={self.num_cpus * self.concurrent_sites}"
        return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(process: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    """Block until the SuperLink `process` accepts connections on 127.0.0.1:`port`; a clear error if it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout_s} s")


def descendants(pid: int) -> list[int]:
    """PIDs of every living process below `pid`, children first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children.get(child, []))
    return found[::-1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (stat field 22): with the PID, it names one process, not a reused PID."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the processes are stopped: a second Ctrl-C must not orphan half of them."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def stage_app(target: Path) -> Path:
    """Copy only the app's files: `flwr run` bundles the folder it is given (a .venv inside would cost minutes)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", target)
    for part in APP_PARTS:
        shutil.copytree(PROJECT_ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


class LocalSimulation:
    """A SuperLink in simulation mode on 127.0.0.1 that this process started and stops, with every process below
    it, by PID."""

    linger_s = 120.0   # how long Flower may take to finish a run after the ServerApp has recorded its end
    stop_s = 1.5       # how long the processes get to end on SIGTERM before SIGKILL (Ctrl-C must stop within 5 s)

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.home = self.folder / "flwr-home"
        self.port = free_port()
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.process: subprocess.Popen | None = None
        self.seen: dict[int, int | None] = {}   # PID -> start time of every process seen below the SuperLink

    def note_processes(self) -> list[int]:
        """Remember the processes below the SuperLink now: one whose parent dies first (Ray's, when SuperExec goes)
        is re-parented away from the tree but must still be stopped."""
        if self.process is None:
            return []
        for pid in [*descendants(self.process.pid), self.process.pid]:
            self.seen.setdefault(pid, start_time(pid))
        return list(self.seen)

    def __enter__(self) -> "LocalSimulation":
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        (self.home / "state.db").unlink(missing_ok=True)   # a run resumed in this folder starts a fresh SuperLink
        log_file = open(self.folder / "superlink.log", "w")
        # its own session: a terminal's Ctrl-C reaches this process alone, which stops the tree in order (__exit__)
        self.process = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port),
             "--database", str(self.home / "state.db"), "--disable-runtime-dependency-installation"],
            env=self.env, cwd=self.folder, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        wait_until_listening(self.process, self.port, self.folder / "superlink.log", timeout_s=60)
        return self


    def __exit__(self, *exc) -> None:
        """Stop the SuperLink and every process seen under it (SuperExec, the simulation process, Ray) by PID:
        SIGTERM, then SIGKILL after `stop_s`. SuperExec starts its own session, so a process-group signal would miss it."""
        if self.process is None:
            return
        with signals_held():
            self.note_processes()
            pids = [pid for pid, started in self.seen.items() if start_time(pid) == started]
            began = time.monotonic()
            for sig, wait_s in ((signal.SIGTERM, self.stop_s), (signal.SIGKILL, 1.0)):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
                    self.process.poll()
                    time.sleep(0.05)
                pids = [pid for pid in pids if _alive(pid)]
                log.info("%s sent; %d processes left after %.1f s", signal.Signals(sig).name, len(pids),
                         time.monotonic() - began)
                if not pids:
                    break
            self.process.wait()

    def flwr(self, *args: str, timeout_s: float = 120) -> str:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def run(self, app: Path, overrides: list[str], sites: int, resources: ClientResources,
            timeout_s: float, on_poll: Callable[[], bool] = lambda: False) -> dict:
        """`flwr run` the app with these Hydra overrides on `sites` virtual SuperNodes and wait for it to
        end; returns Flower's record of the run (its status says whether it completed: the exit code does not).

        `on_poll` is called every second and returns True once the run's own records say it ended; Flower
        itself is asked only every `ask_every_s` (each `flwr` call starts a Python process)."""
        run_config = self.folder / "run_config.toml"
        run_config.write_text(f"overrides = {json.dumps(shlex.join(overrides))}\n")
        started = json.loads(self.flwr(
            "run", str(app), CONNECTION, "--run-config", str(run_config), "--format", "json",
            "--federation-config", resources.federation_config(sites)))
        run_id = str(started["run-id"])
        deadline, next_ask = time.monotonic() + timeout_s, time.monotonic() + 20
        ended_at = None
        while True:
            self.note_processes()
            ended = on_poll()
            if ended and ended_at is None:
                ended_at = time.monotonic()
            if ended or time.monotonic() > next_ask:
                record = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"][0]
                if record["status"].startswith("finished"):
                    break
                if ended_at is not None and time.monotonic() - ended_at > self.linger_s:
                    # The ServerApp has ended the run (e.g. a round with too few sites) but a virtual site is
                    # still training for it: without a timeout this would wait for nothing.
                    self.flwr("stop", run_id, CONNECTION)
                    record = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"][0]
                    break
                next_ask = time.monotonic() + (2 if ended else 20)
            if time.monotonic() > deadline:
                self.flwr("stop", run_id, CONNECTION)
                raise TimeoutError(f"Flower run {run_id} did not finish within {timeout_s} s; stopped it")
            time.sleep(1.0)
        on_poll()
        logs = subprocess.run([str(BIN / "flwr"), "log", run_id, CONNECTION, "--show"], env=self.env, cwd=self.folder,
                              capture_output=True, text=True, timeout=120).stdout
        (self.folder / "flower_run.log").write_text(logs)
        return record
