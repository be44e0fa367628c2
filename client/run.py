"""Hospital entry point: `python client/run.py --site A` checks the site, indexes its data, runs its SuperNode."""
from __future__ import annotations

import argparse
import os
import secrets
import stat
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make the `client` package importable
    sys.path.insert(0, str(PROJECT_ROOT))

from client.preflight import (TransientError, check_node, check_superlink, deactivate_node,  # noqa: E402
                              permanent_failure)
from client.site import SITE_DIR, SiteConfigError, data_paths, load_site, site_file  # noqa: E402


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise SiteConfigError(f"SuperLink at {address} is unreachable ({err}); check the address in the site file, "
                              "the coordinator's firewall, and that flower-superlink is running") from err


def index_data(site: dict) -> None:
    """Bring the site's catalog up to date (incremental: unchanged files are skipped) and print its summary."""
    from client.data.__main__ import main as data_main

    data = site["data"]
    catalog, cache = data_paths(site)
    # allow_outside_root: the site's own opt-in for images or reports linked from shared storage outside its root
    options = (["--reports", str(data["reports"])] if data.get("reports") else []) \
        + (["--manifest", str(data["manifest"])] if data.get("manifest") else []) \
        + (["--allow-outside-root"] if data.get("allow_outside_root") else [])
    code = data_main(["index", "--root", data["root"], "--layout", data["layout"], "--catalog", catalog,
                      "--cache", str(cache), *options])
    if code:
        raise SiteConfigError(f"indexing {data['root']} failed (exit {code})")


SECRET_FILE = "superexec.secret"


def superexec_secret(site: dict) -> Path:
    """The site's SuperExec secret (`superexec_secret` in the site file, else `<state_dir>/superexec.secret`):
    created once, mode 0600, and re-used. The SuperNode hands a round's task only to a launcher that signs its
    request with it, so no other local process can take the site's training task from the runtime API."""
    path = Path(site.get("superexec_secret") or Path(site["state_dir"]) / SECRET_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size == 0:
        raise SiteConfigError(f"SuperExec secret {path} must be a non-empty regular file owned by this user; "
                              "delete it and client/run.py makes a new one")
    if info.st_mode & 0o077:
        raise SiteConfigError(f"SuperExec secret {path} is readable by other users (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}")
    return path


def supernode_command(site: dict, site_path: Path) -> tuple[list[str], dict[str, str]]:
    """The flower-supernode command line and environment for this site (TLS, node key, node config)."""
    bin_dir = Path(sys.executable).parent
    executable = bin_dir / "flower-supernode"
    if not executable.exists():
        executable = Path(shutil.which("flower-supernode") or executable)
    command = [
        str(executable),
        "--superlink", str(site["superlink"]),
        "--root-certificates", site["root_certificates"],
        "--auth-supernode-private-key", site["node_private_key"],
        "--node-config", f'site-file="{site_path.resolve()}"',
        "--host", "127.0.0.1", "--port", str(site.get("supernode_port") or 9094),
        # Only a process holding the secret may take tasks from the runtime API: launcher_command's process.
        "--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret(site)),
    ]
    if site.get("trusted_entities"):
        command += ["--trusted-entities", site["trusted_entities"]]
    if site.get("max_retries") is not None:
        command += ["--max-retries", str(site["max_retries"])]
    env = dict(os.environ)
    # The SuperNode starts `flwr-clientapp` by name: it must find this venv's, not another install's.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_HOME", str(Path(site["state_dir"]) / "flwr"))  # installed app bundles of this site
    return command, env


def launcher_command(site: dict) -> list[str]:
    """The process that takes ClientApp tasks from the SuperNode's runtime API, signed with the site's secret:
    the warm launcher (client/clientapp_launcher.py), or Flower's SuperExec (a fresh interpreter per message)."""
    address, secret = f"127.0.0.1:{site.get('supernode_port') or 9094}", str(superexec_secret(site))
    if site["clientapp_launcher"] == "warm":  # load_site fills in the default
        return [sys.executable, str(Path(__file__).resolve().parent / "clientapp_launcher.py"),
                "--runtime-api-address", address, "--parent-pid", str(os.getpid()), "--superexec-secret-file", secret]
    return [str(Path(sys.executable).parent / "flower-superexec"), "--insecure", "--runtime-api-address", address,
            "--parent-pid", str(os.getpid()), "--superexec-auth-secret-file", secret]


# Flower's SUPERNODE_CONNECTION_ERROR: the SuperLink could not be reached, or refused to activate this node. The
# latter happens when a site restarts after a crash: the SuperLink keeps the node's old session online until two of
# its 30 s heartbeats are missed, so the supervisor retries every 5 s for well over that (a site back within seconds
# of the lapse still joins the round in progress, see server.app.exchange). The SuperNode's process exits with 1
# for every error; only its log names the code, so the supervisor reads the log as it passes it on.
RESTARTABLE = "Exit Code: 305"
RESTART_DELAYS_S = (2.0,) + (5.0,) * 29
SETTLED_S = 300.0  # a SuperNode that ran this long before losing its link starts a fresh series of retries
# Flower's SuperNode takes ~5 s to exit after SIGTERM (its exit waits on threads until a 5 s forced exit). A site
# asked to stop gives it this long, then kills it and tells the SuperLink the node is offline itself (after_kill),
# so a restart is accepted at once instead of after the node's heartbeats lapse.
STOP_GRACE_S = 1.0
ACTIVATED = b"SuperNode ID: "


def _die_with_parent() -> None:
    """In the SuperNode child (Linux): receive SIGTERM if this supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pass_on(stream, seen: list, classify) -> None:
    """Copy the child's output to ours line by line; note whether it named the restartable exit (seen[0]) and
    the first permanent failure `classify` finds in a line (seen[1])."""
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if RESTARTABLE.encode() in line:
            seen[0] = True
        if classify is not None and seen[1] is None:
            seen[1] = classify(line.decode(errors="replace"))
        if ACTIVATED in line and line.rsplit(ACTIVATED, 1)[1].split()[:1] and \
                line.rsplit(ACTIVATED, 1)[1].split()[0].isdigit():
            seen[2] = int(line.rsplit(ACTIVATED, 1)[1].split()[0])


def supervise(command: list[str], env: dict[str, str], delays: tuple[float, ...] = RESTART_DELAYS_S,
              settled_s: float = SETTLED_S, classify=None, after_kill=None, stop_grace_s: float = STOP_GRACE_S,
              recheck=None) -> int:
    """Run the SuperNode as a child, forward SIGTERM/SIGINT/SIGHUP to it, and restart it with backoff when it
    exits because it could not connect or be activated; its exit code once it stops for good. `classify(line)`
    names a permanent failure in a log line (an error whose message says the fix): then no restart; `recheck()`
    runs before each restart and raises SiteConfigError when one would not help. A child still
    running `stop_grace_s` after a forwarded signal is killed and `after_kill(node_id)` called (node id from its
    log, None if it never connected)."""
    stopping = threading.Event()
    stop_asked = [0.0]
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        if not stopping.is_set():
            stop_asked[0] = time.monotonic()
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def wait_for_child() -> int:
        while True:
            try:
                return child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if stopping.is_set() and time.monotonic() - stop_asked[0] > stop_grace_s:
                    child.kill()
                    child.wait()
                    if after_kill is not None:
                        after_kill(seen[2])
                    return 0  # stopped as asked

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    failures = 0
    while True:
        started, seen = time.monotonic(), [False, None, None]
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
        reader = threading.Thread(target=_pass_on, args=(child.stdout, seen, classify), daemon=True)
        reader.start()
        code = wait_for_child()
        reader.join(timeout=1 if stopping.is_set() else 5)  # the SuperNode's own children may hold the pipe open a little longer
        if seen[1] is not None and not stopping.is_set():
            print(f"error: {seen[1]}", file=sys.stderr, flush=True)
            return code or 1
        if code == 0 or not seen[0] or stopping.is_set():
            return 128 - code if code < 0 else code
        if recheck is not None:
            try:
                recheck()
            except SiteConfigError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return code
        if time.monotonic() - started > settled_s:
            failures = 0
        if failures >= len(delays):
            print(f"error: the SuperNode could not connect to or be activated by the SuperLink after {failures + 1} "
                  "attempts; check that flower-superlink runs and that this node's public key is registered "
                  "(flwr supernode register)", file=sys.stderr, flush=True)
            return code
        delay = delays[failures]
        failures += 1
        print(f"the SuperNode stopped ({RESTARTABLE}: it could not connect, or the SuperLink still holds this node's "
              f"previous session as online until its heartbeats lapse); restarting in {delay:g} s, attempt "
              f"{failures + 1} of {len(delays) + 1}", flush=True)
        if stopping.wait(delay):
            return code


def recheck(site: dict) -> None:
    """Before a restart: raise PermanentError if the SuperLink does not know the node key (a refused activation
    also means a node still held online, which a retry fixes); a SuperLink that cannot be asked now is retried."""
    try:
        check_node(site)
    except TransientError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python client/run.py", description=__doc__)
    parser.add_argument("--site", required=True, help="site name (configs/site/<name>.yaml) or a path to a site file")
    parser.add_argument("--site-dir", type=Path, default=SITE_DIR, help="folder of site files")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the command, do not start")
    args = parser.parse_args(argv)
    try:
        path = site_file(args.site, args.site_dir)
        site = load_site(path)
        check_reachable(str(site["superlink"]))
        try:
            learned = f"TLS verified against {site['root_certificates']}, Fleet API answers, {check_superlink(site)}"
        except TransientError as err:  # the SuperNode's own retries may still get through
            learned = f"could not check the SuperLink now ({err}); the SuperNode will retry"
        print(f"site {site['name']}: SuperLink {site['superlink']}: {learned}", flush=True)
        if site["data"].get("index", True):
            index_data(site)
        command, env = supernode_command(site, path)
    except SiteConfigError as err:  # PermanentError included: its message names the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"site {site['name']}: dry run, data {site['data']['root']}; the SuperNode would run as:")
        print(" ".join(command))
        return 0
    print(f"site {site['name']}: data {site['data']['root']}; starting the SuperNode", flush=True)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    delays = site.get("restart_delays_s")
    launcher = launcher_command(site)
    # The launcher outlives SuperNode restarts (it polls the same local port) and dies with this process.
    warm = subprocess.Popen(launcher, env=env, preexec_fn=_die_with_parent)
    try:
        return supervise(command, env, RESTART_DELAYS_S if delays is None else tuple(float(d) for d in delays),
                         classify=lambda line: permanent_failure(site, line),
                         after_kill=lambda node_id: deactivate_node(site, node_id), recheck=lambda: recheck(site))
    finally:
        warm.terminate()
        try:
            warm.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            warm.kill()
            warm.wait()


if __name__ == "__main__":
    sys.exit(main())
