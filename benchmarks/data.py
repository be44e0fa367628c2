"""Whether the data path keeps up: cache loader vs the tiny training step, and DICOM decode and indexing rates."""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import pydicom
import torch
from torch.utils.data import DataLoader

from benchmarks.common import all_terms_step, build
from client.data.dataset import CxrDataset
from client.data.images import read_image
from client.data.index import index_data
from client.data.layouts import open_layout
from client.trainer import build_optimizer
from shared_models.batch import collate
from simulations.phantom import generate_phantom

MODEL, OBJECTIVE, BATCH_SIZE = "tiny", "hybrid", 16
PHANTOM_SIZE = 1024          # pixels on the phantom's long side; MIMIC-CXR's are ~2500-3000
CACHE_SHORT_SIDE = 256       # the data configs' cache_short_side


def endless(loader: DataLoader):
    while True:
        yield from loader


def decode_rates(dicoms: list[Path], passes: int) -> dict:
    """read_image over every file, `passes` times: images/s (median pass) and per transfer syntax."""
    syntax = {path: pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name for path in dicoms}
    per_syntax: dict[str, list[float]] = defaultdict(list)
    pass_rates, megapixels = [], 0.0
    for _ in range(passes):
        started = time.perf_counter()
        for path in dicoms:
            mark = time.perf_counter()
            pixels = read_image(path).pixels
            per_syntax[syntax[path]].append(time.perf_counter() - mark)
            megapixels += pixels.size / 1e6
        pass_rates.append(len(dicoms) / (time.perf_counter() - started))
    seconds = sum(sum(times) for times in per_syntax.values())
    return {"images_per_s": statistics.median(pass_rates), "megapixels_per_s": megapixels / seconds,
            "by_transfer_syntax": {name: {"images": len(times) // passes, "images_per_s": round(len(times) / sum(times), 2)}
                                   for name, times in sorted(per_syntax.items())}}


def train_step_seconds(model, optimizer, batch: dict, step: int) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(batch, step=step)["loss"].backward()
    optimizer.step()
    return time.perf_counter() - started


def run(quick: bool = False) -> dict:
    studies, repeats, loader_batches, passes = (12, 2, 2, 1) if quick else (24, 3, 4, 2)
    with tempfile.TemporaryDirectory(prefix="fedcxr-bench-data-") as tmp:
        root = generate_phantom(Path(tmp) / "phantom", studies, seed=0, size=PHANTOM_SIZE)
        dicoms = sorted(root.glob("files/*/*/*/*.dcm"))
        decode = decode_rates(dicoms, passes)

        started = time.perf_counter()
        summary = index_data(open_layout("mimic_cxr", root), Path(tmp) / "catalog.sqlite", Path(tmp) / "cache",
                             short_side=CACHE_SHORT_SIDE)
        index_seconds = time.perf_counter() - started
        files_indexed = summary["indexed"]

        cfg, model = build(MODEL, OBJECTIVE)
        image_size = int(cfg.model.image.img_size)
        dataset = CxrDataset(Path(tmp) / "catalog.sqlite", Path(tmp) / "cache", image_size=image_size, augmentation={})
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0,
                            collate_fn=partial(collate, tokenizer=model.tokenizer,
                                               max_length=int(cfg.model.text.max_length)))
        batches = endless(loader)
        model.train()
        optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)
        step = all_terms_step(cfg)
        batch = next(batches)
        train_step_seconds(model, optimizer, batch, step)    # warm-up (and the tag queries' first refresh)

        # Loader and training step alternate so both see the same machine load.
        loader_rates, train_rates = [], []
        for _ in range(repeats):
            images, started = 0, time.perf_counter()
            for _ in range(loader_batches):
                images += len(next(batches)["images"])
            loader_rates.append(images / (time.perf_counter() - started))
            train_rates.append(len(batch["images"]) / train_step_seconds(model, optimizer, batch, step))
    cache_rate, train_rate = statistics.median(loader_rates), statistics.median(train_rates)
    return {
        "cache_images_per_s": round(cache_rate, 2),
        "train_images_per_s": round(train_rate, 2),
        "ratio": round(cache_rate / train_rate, 3),
        "dicom_decode_images_per_s": round(decode["images_per_s"], 2),
        "dicom_decode_megapixels_per_s": round(decode["megapixels_per_s"], 2),
        "dicom_decode_by_transfer_syntax": decode["by_transfer_syntax"],
        "index_files_per_s": round(files_indexed / index_seconds, 2),
        "index_summary": {"indexed": files_indexed, "rejected": summary["rejected"], "studies": summary["studies"]},
        "model": MODEL, "objective": OBJECTIVE, "batch_size": BATCH_SIZE, "image_size": image_size,
        "dataset_images": len(dataset), "dicoms": len(dicoms), "phantom_size": PHANTOM_SIZE,
        "cache_short_side": CACHE_SHORT_SIDE, "loader_workers": 0, "repeats": repeats,
    }
