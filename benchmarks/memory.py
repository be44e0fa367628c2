"""Peak resident memory of a fresh site-like process that builds a model and runs a few training steps.

`python -m benchmarks.memory MODEL --batch-size B --steps K` is the child: it prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path

MODELS = {"tiny": 16, "resnet50_bert": 8}   # model -> batch size (each at its configured image size)
STEPS = 2   # the first step allocates gradients and optimizer state; the second shows the steady peak


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's ru_maxrss survives exec: a child started by a large parent (this benchmark, after the
    objectives section) would report the parent's peak. VmHWM belongs to the current image only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2 ** 20)


def child(model_name: str, batch_size: int, steps: int) -> dict:
    import torch

    from benchmarks.common import all_terms_step, build, synthetic_samples
    from client.trainer import TrainSettings, train_steps
    from shared_models.batch import collate

    imported = peak_rss_mb()
    cfg, model = build(model_name, "hybrid")
    built = peak_rss_mb()
    samples = synthetic_samples(batch_size * steps, int(cfg.model.image.img_size))
    settings = TrainSettings(steps=steps, batch_size=batch_size, warmup_steps=0, amp=False,
                             start_step=all_terms_step(cfg), log_every=steps)
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
    train_steps(model, samples, collate_fn, settings, progress=False)
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "after_imports_mb": round(imported, 1),
            "after_build_mb": round(built, 1), "batch_size": batch_size, "steps": steps,
            "parameters_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20, 1),
            "torch_threads": torch.get_num_threads()}


def measure(model_name: str, batch_size: int, steps: int = STEPS) -> dict:
    """Run the child in a fresh interpreter (so nothing this process holds is counted) and read its JSON."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", model_name, "--batch-size", str(batch_size), "--steps", str(steps)],
        cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {model_name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, models: dict[str, int] | None = None) -> dict:
    # Peak memory does not get noisier with fewer repetitions: quick runs measure the same thing.
    return {name: measure(name, batch_size) for name, batch_size in (models or MODELS).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    print(json.dumps(child(args.model, args.batch_size, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
