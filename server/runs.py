"""`python -m server.runs list|show RUN [--registry URL]`: print what the run registry holds."""
from __future__ import annotations

import argparse
import sys

from server.registry import Registry, to_json

DEFAULT_REGISTRY = "outputs/federation/registry.sqlite"


def _list(registry: Registry) -> None:
    print(f"{'run':<28} {'status':<9} {'rounds':>6}  {'started (UTC)':<19}  error")
    for run in registry.runs():
        rounds_done = len(registry.describe(run.name)["checkpoints"])
        print(f"{run.name:<28} {run.status:<9} {rounds_done:>2}/{run.rounds_planned:<3}  "
              f"{run.started_at:%Y-%m-%d %H:%M:%S}  {run.error or ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.runs", description=__doc__)
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="SQLAlchemy URL or SQLite file path")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per run")
    show = sub.add_parser("show", help="rounds, per-site metrics, checkpoints and rejections of one run (JSON)")
    show.add_argument("run")
    args = parser.parse_args(argv)

    registry = Registry(args.registry)
    if args.command == "list":
        _list(registry)
        return 0
    try:
        print(to_json(registry.describe(args.run)))
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
