"""`python -m benchmarks.run SECTION --json PATH`: speed, bytes, memory and privacy cost as ratios measured in one run."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.report import render_markdown

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {}


def section(name: str):
    def register(fn):
        SECTIONS[name] = fn
        return fn

    return register


def machine_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@section("objectives")
def _objectives(args) -> dict:
    from benchmarks.objectives import run

    return run(quick=args.quick)


@section("hardware")
def _hardware(args) -> dict:
    from benchmarks.hardware import run

    return run(quick=args.quick)


@section("data")
def _data(args) -> dict:
    from benchmarks.data import run

    return run(quick=args.quick)


@section("federation")
def _federation(args) -> dict:
    from benchmarks.federation import run

    return run(quick=args.quick)


@section("privacy")
def _privacy(args) -> dict:
    from benchmarks.privacy import run

    return run(quick=args.quick)


@section("scale")
def _scale(args) -> dict:
    from benchmarks.scale import run

    return run(quick=args.quick)


@section("memory")
def _memory(args) -> dict:
    from benchmarks.memory import run

    return run(quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("section", choices=sorted(SECTIONS) + ["all"])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke runs)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.section == "all":
        results: dict = {"machine": machine_info()}
        seconds = results["machine"]["section_seconds"] = {}
        for name, fn in SECTIONS.items():
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            section_started = time.perf_counter()
            results[name] = fn(args)
            seconds[name] = round(time.perf_counter() - section_started, 1)
    else:
        results = SECTIONS[args.section](args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    if args.section == "all":
        args.json.with_suffix(".md").write_text(render_markdown(results))
    print(json.dumps(results, indent=2))
    print(f"[bench] wrote {args.json} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
