"""One site on N processes, and whether the data path could feed a GPU (docs/scale.md).

- DDP: the same global batch trained by 1 process and by 2 (gloo on CPU, NCCL on GPUs), seconds per optimizer
  step, through the real trainer (`client.trainer.train_steps` under `client.distributed.run`).
- Data: the cache loader's images/s at 224 px with one DataLoader worker per core, against the rate a GPU
  trains ResNet-50 at (GPU_IMAGES_PER_S): a `resnet50_bert` step, with its BERT passes, needs fewer.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import build, synthetic_samples
from client import distributed
from client.data.dataset import CxrDataset
from client.data.index import index_data
from client.data.layouts import open_layout
from client.data.transforms import augmentation_settings
from client.trainer import TrainSettings, train_steps
from shared_models.batch import collate
from simulations.phantom import generate_phantom

MODEL, OBJECTIVE, GLOBAL_BATCH = "tiny", "clip", 16
# ResNet-50 training throughput of one A100 with AMP in timm's benchmark: ~2,600 images/s
# (github.com/huggingface/pytorch-image-models/issues/1491). An upper bound for `resnet50_bert`, whose step adds
# BERT-base passes over each report; an H100 is faster still, so this is the figure to beat, not a target.
GPU_IMAGES_PER_S = 2600
GPU_SOURCE = "timm benchmark, ResNet-50 training, A100, AMP (pytorch-image-models issue #1491)"
LOADER_SIZE, LOADER_BATCH = 224, 32
PHANTOM_SIZE, CACHE_SHORT_SIDE = 1024, 256


def seconds_per_step(cfg, weights: dict, samples: list[dict], steps: int) -> float:
    """Train `steps` optimizer steps after one warm-up step; seconds per step (rank 0's, equal on every rank)."""
    torch.manual_seed(0)
    model = build(cfg.model.name, cfg.objective.name)[1]
    model.load_state_dict(weights)
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
    settings = TrainSettings(steps=1, batch_size=GLOBAL_BATCH, warmup_steps=0, amp=True, nproc=distributed.world_size())
    train_steps(model, samples, collate_fn, settings, progress=False)  # warm-up: allocations, DDP buckets
    settings.steps = steps
    return train_steps(model, samples, collate_fn, settings, progress=False).seconds / steps


def ddp_step_times(steps: int) -> dict:
    cfg, model = build(MODEL, OBJECTIVE)
    samples = synthetic_samples(4 * GLOBAL_BATCH, int(cfg.model.image.img_size))
    weights = model.state_dict()
    one = seconds_per_step(cfg, weights, samples, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU work of one rank: 2 ranks share the cores one thread each
    one_thread = seconds_per_step(cfg, weights, samples, steps)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    two = distributed.run(seconds_per_step, (cfg, weights, samples, steps), nproc=2, run_id="bench-scale")
    return {
        "model": MODEL, "objective": OBJECTIVE, "global_batch": GLOBAL_BATCH, "steps": steps,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "one_process_s_per_step": round(one, 4), "one_process_threads": threads,
        "one_process_one_thread_s_per_step": round(one_thread, 4), "two_processes_s_per_step": round(two, 4),
        "ratio_two_over_one": round(two / one, 3), "ratio_two_over_one_thread": round(two / one_thread, 3),
        "worker_group_seconds": round(time.perf_counter() - started, 1),  # spawn, imports, rendezvous included
    }


def loader_rate(workers: int, batches: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedcxr-bench-scale-") as tmp:
        root = generate_phantom(Path(tmp) / "phantom", 24, seed=0, size=PHANTOM_SIZE)
        index_data(open_layout("mimic_cxr", root), Path(tmp) / "catalog.sqlite", Path(tmp) / "cache",
                   short_side=CACHE_SHORT_SIDE)
        cfg, model = build(MODEL, OBJECTIVE)
        collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
        rate = images_per_s(CxrDataset(Path(tmp) / "catalog.sqlite", Path(tmp) / "cache", image_size=LOADER_SIZE,
                                       augmentation=augmentation_settings(cfg.train)), collate_fn, workers, batches)
        plain = images_per_s(CxrDataset(Path(tmp) / "catalog.sqlite", Path(tmp) / "cache", image_size=LOADER_SIZE,
                                        augmentation={}), collate_fn, workers, batches)
        return {
            "cache_images_per_s": round(rate, 1), "loader_workers": workers, "image_size": LOADER_SIZE,
            "cache_images_per_s_without_augmentation": round(plain, 1),
            "cache_format": "uint8 memory-mapped shards (client/data/cache.py), short side "
                            f"{CACHE_SHORT_SIDE}",
            "gpu_images_per_s_assumed": GPU_IMAGES_PER_S, "gpu_source": GPU_SOURCE,
            "share_of_gpu_rate": round(rate / GPU_IMAGES_PER_S, 4),
            "cores_to_feed_one_gpu": round(GPU_IMAGES_PER_S / (rate / max(1, workers)), 1),
        }


def images_per_s(dataset, collate_fn, workers: int, passes: int) -> float:
    loader = DataLoader(dataset, batch_size=LOADER_BATCH, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=collate_fn)
    rates = []
    for epoch in range(passes + 1):  # the first pass starts the workers: not timed
        images, started = 0, time.perf_counter()
        for batch in loader:
            images += len(batch["images"])
        if epoch:
            rates.append(images / (time.perf_counter() - started))
    return statistics.median(rates)


def run(quick: bool = False) -> dict:
    workers = os.cpu_count() or 1
    return {
        "ddp": ddp_step_times(steps=2 if quick else 5),
        "data": loader_rate(workers, batches=1 if quick else 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
