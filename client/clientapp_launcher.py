"""A warm ClientApp launcher for a SuperNode in `--isolation process` mode: imports the ML stack once, then forks
one process per task, so a round's ClientApp starts in about a second instead of re-importing torch, timm and
transformers (10-25 s on a small machine; Flower's own SuperExec starts a fresh interpreter per message).

Each task still runs in its own process through Flower's `run_clientapp` (its own Runtime API session, token and
exit), exactly as `flwr-clientapp` would run it; only the interpreter start-up is shared. The app's own code is
not imported here: each task loads it from the run's app bundle, as Flower installs it. That is why this file runs
by path (`python client/clientapp_launcher.py`, as client/run.py starts it), never as `client.clientapp_launcher`:
a `client` package already imported would shadow the bundle's.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run by path: this folder must not make the project's modules importable by short names
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor  # noqa: E402
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402
from flwr.supernode.runtime.run_clientapp import run_clientapp  # noqa: E402

# What every round's ClientApp imports; loading them here, before any fork, is the whole point. No torch op runs
# in this process, so no thread pool exists yet that a child could inherit in a broken state.
PRELOAD = ("torch", "torchvision", "timm", "transformers", "safetensors", "numpy", "omegaconf", "hydra", "PIL")
PROJECT_PACKAGES = {"client", "server", "shared_models", "simulations", "evaluation", "benchmarks"}
# The Runtime API calls a SuperNode started with --superexec-auth-secret-file checks for the shared secret's HMAC;
# every other call needs the task token that only an authenticated AcquireTask hands out.
AUTHENTICATED_METHODS = ("/flwr.proto.Runtime/AcquireTask",)


def preload() -> float:
    started = time.perf_counter()
    for name in PRELOAD:
        __import__(name)
    return time.perf_counter() - started


def run_task(runtime_api_address: str, token: str) -> int:
    """In the forked child: run one ClientApp task the way `flwr-clientapp` does; its exit code."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        stale = [name for name in sys.modules if name.partition(".")[0] in PROJECT_PACKAGES]
        if stale:  # the bundle's code must load fresh (see the module docstring)
            raise RuntimeError(f"the launcher imported project modules {stale[:3]}; the run's app bundle would not load")
        print(f"clientapp_launcher: ClientApp task started (pid {os.getpid()})", flush=True)
        run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                      parent_pid=os.getppid(), runtime_dependency_install=False)
    except SystemExit as done:  # run_clientapp ends with flwr_exit, i.e. sys.exit
        return done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # noqa: BLE001 — a child must never return into the parent's loop
        print(f"clientapp_launcher: task failed: {err!r}", file=sys.stderr, flush=True)
        return 1
    return 0


def reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def runtime_client(runtime_api_address: str, secret: bytes | None) -> RuntimeHttpClient:
    """A Runtime API client that signs its AcquireTask calls with the site's SuperExec secret (if given)."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=AUTHENTICATED_METHODS))
    # No retry invoker: serve() retries itself, and Flower's would SIGINT this process on a 401 (a refused secret).
    return RuntimeHttpClient.from_server_address(server_address=runtime_api_address, insecure=True,
                                                 root_certificates=None, interceptors=interceptors)


def serve(runtime_api_address: str, poll_s: float, parent_pid: int | None, secret: bytes | None = None) -> int:
    client = runtime_client(runtime_api_address, secret)
    children: set[int] = set()
    stopping = []

    def stop(signum, _frame) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reported_unreachable = False
    while not stopping:
        if parent_pid is not None and os.getppid() != parent_pid:
            break  # the site's supervisor is gone
        reap(children)
        try:
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            reported_unreachable = False
        except Exception as err:  # noqa: BLE001 — the SuperNode restarts (its supervisor retries); keep polling
            if not reported_unreachable:
                reported_unreachable = True
                why = ("refused this launcher's SuperExec secret: client/run.py starts both with the site's "
                       "superexec_secret file" if "401" in str(err) else "not answering")
                print(f"clientapp_launcher: SuperNode at {runtime_api_address} {why} ({err}); retrying",
                      file=sys.stderr, flush=True)
            time.sleep(1.0)
            continue
        if reply.HasField("task") and reply.token:
            pid = os.fork()
            if pid == 0:
                code = run_task(runtime_api_address, reply.token)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            children.add(pid)
            continue  # another task may be waiting (e.g. SecAgg+ stages arrive back to back)
        time.sleep(poll_s)
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python client/clientapp_launcher.py", description=__doc__)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--poll-s", type=float, default=0.2, help="how often to ask the SuperNode for a task")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer the parent")
    parser.add_argument("--superexec-secret-file", type=Path, default=None,
                        help="the SuperNode's --superexec-auth-secret-file: signs the launcher's task requests")
    args = parser.parse_args(argv)
    secret = args.superexec_secret_file.read_bytes() if args.superexec_secret_file else None
    seconds = preload()
    print(f"clientapp_launcher: ML stack imported in {seconds:.1f} s; serving ClientApp tasks from "
          f"{args.runtime_api_address}", flush=True)
    return serve(args.runtime_api_address, args.poll_s, args.parent_pid, secret)


if __name__ == "__main__":
    sys.exit(main())
