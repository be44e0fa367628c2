"""Hospital entry point: `python client/run.py --site A` checks the site, indexes its data, becomes its SuperNode."""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make the `client` package importable
    sys.path.insert(0, str(PROJECT_ROOT))

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
    code = data_main(["index", "--root", data["root"], "--layout", data["layout"], "--catalog", catalog,
                      "--cache", str(cache)])
    if code:
        raise SiteConfigError(f"indexing {data['root']} failed (exit {code})")


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
        "--port", str(site.get("supernode_port") or 9094),
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
        if site["data"].get("index", True):
            index_data(site)
    except SiteConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command, env = supernode_command(site, path)
    print(f"site {site['name']}: data {site['data']['root']}, SuperLink {site['superlink']}; starting the SuperNode",
          flush=True)
    if args.dry_run:
        print(" ".join(command))
        return 0
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    os.execve(command[0], command, env)  # this process becomes the SuperNode (same PID, signals reach it)


if __name__ == "__main__":
    sys.exit(main())
