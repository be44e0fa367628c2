"""`python -m server.runs list|show RUN|sites [--registry URL]`: print what the run registry holds.

Without --registry it looks, in order, at $FEDCXR_REGISTRY, beside every running `flower-superlink` of this
user (the ServerApp's default `outputs/federation/registry.sqlite` under the SuperLink's working folder, and
`registry.sqlite` in its --database folder or one folder below), then `./outputs/federation/registry.sqlite`;
it uses the one registry it finds, and names every place it looked when it finds none or several.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from server.registry import Registry, to_json

DEFAULT_REGISTRY = "outputs/federation/registry.sqlite"   # federation.output_dir's default, from the working folder
REGISTRY_FILE = "registry.sqlite"
ENV_REGISTRY = "FEDCXR_REGISTRY"


class RegistryNotFound(LookupError):
    pass


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def running_superlinks(proc: Path = Path("/proc")) -> list[tuple[int, Path, Path | None]]:
    """(pid, working folder, --database file or None when in memory) of each flower-superlink this user can see."""
    found = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:   # gone, or another user's
            continue
        # `flower-superlink ...` runs as [python, .../bin/flower-superlink, ...]
        if not any(Path(arg).name == "flower-superlink" for arg in argv[:2]):
            continue
        database = _option(argv, "--database")
        in_memory = database is None or database.startswith(":")
        found.append((int(entry.name), cwd, None if in_memory else cwd / database))
    return found


def candidate_registries(cwd: Path | None = None, env: dict | None = None,
                         superlinks: list | None = None) -> list[tuple[Path, str]]:
    """Every place (a path, possibly with a `*`) a registry may be, with why it is looked at, in order."""
    cwd = Path.cwd() if cwd is None else cwd
    env = os.environ if env is None else env
    superlinks = running_superlinks() if superlinks is None else superlinks
    places: list[tuple[Path, str]] = []
    if env.get(ENV_REGISTRY):
        places.append((Path(env[ENV_REGISTRY]), f"${ENV_REGISTRY}"))
    for pid, link_cwd, database in superlinks:
        places.append((link_cwd / DEFAULT_REGISTRY, f"the ServerApp's default in SuperLink pid {pid}'s folder"))
        if database is not None:
            places.append((database.parent / REGISTRY_FILE, f"SuperLink pid {pid}'s --database folder"))
            places.append((database.parent / "*" / REGISTRY_FILE, f"below SuperLink pid {pid}'s --database folder"))
    places.append((cwd / DEFAULT_REGISTRY, "the ServerApp's default in the current folder"))
    return places


def _existing(place: Path) -> list[Path]:
    if "*" in place.parent.name:
        return sorted(p for p in place.parent.parent.glob(f"{place.parent.name}/{place.name}") if p.is_file())
    return [place] if place.is_file() else []


def find_registry(explicit: str | None, **where) -> str:
    """The registry to read: `explicit` (a URL, or a file that must exist), else the one found by looking."""
    if explicit:
        if "://" in explicit or Path(explicit).is_file():
            return explicit
        raise RegistryNotFound(f"no registry at {explicit} (the ServerApp writes federation.registry, default "
                               f"<federation.output_dir>/{REGISTRY_FILE})")
    superlinks = where.pop("superlinks", None)
    superlinks = running_superlinks() if superlinks is None else superlinks
    places = candidate_registries(superlinks=superlinks, **where)
    found: dict[Path, str] = {}
    for place, why in places:
        for path in _existing(place):
            found.setdefault(path.resolve(), why)
    if len(found) == 1:
        return str(next(iter(found)))
    looked = "\n".join(f"  {place}  ({why})" for place, why in places)
    if not superlinks:
        looked += "\n  (no flower-superlink process of this user is running here)"
    if not found:
        raise RegistryNotFound(f"no run registry found; looked at:\n{looked}\nname it with --registry PATH "
                               f"(federation.registry, default <federation.output_dir>/{REGISTRY_FILE}) or "
                               f"${ENV_REGISTRY}")
    listed = "\n".join(f"  {path}  ({why})" for path, why in found.items())
    raise RegistryNotFound(f"{len(found)} run registries found; choose one with --registry PATH:\n{listed}")


def _list(registry: Registry) -> None:
    print(f"{'run':<28} {'status':<9} {'rounds':>6}  {'started (UTC)':<19}  error")
    for run in registry.runs():
        rounds_done = len(registry.describe(run.name)["checkpoints"])
        print(f"{run.name:<28} {run.status:<9} {rounds_done:>2}/{run.rounds_planned:<3}  "
              f"{run.started_at:%Y-%m-%d %H:%M:%S}  {run.error or ''}")


def _sites(registry: Registry, run: str | None) -> list[dict]:
    rows = registry.sites(run)
    print(f"{'node id':<20}  {'site':<16} {'rounds joined':>13} {'rejected':>8}  {'last seen (UTC)':<19}  runs")
    for row in rows:
        seen = f"{row['last_seen']:%Y-%m-%d %H:%M:%S}" if row["last_seen"] else "-"
        print(f"{row['node_id']:<20}  {row['site']:<16} {row['rounds_joined']:>13} {row['rejected']:>8}  "
              f"{seen:<19}  {', '.join(row['runs'])}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="SQLAlchemy URL or SQLite file path (default: look for it, see above)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per run")
    show = sub.add_parser("show", help="rounds, per-site metrics, checkpoints and rejections of one run (JSON)")
    show.add_argument("run")
    sites = sub.add_parser("sites", help="node id <-> site name, rounds joined, rejections, last seen")
    sites.add_argument("--run", help="only this run")
    sites.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    try:
        location = find_registry(args.registry)
    except RegistryNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.registry:
        print(f"registry: {location}", file=sys.stderr)
    registry = Registry(location)
    if args.command == "list":
        _list(registry)
        return 0
    if args.command == "sites":
        rows = _sites(registry, args.run)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
        return 0
    try:
        print(to_json(registry.describe(args.run)))
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
