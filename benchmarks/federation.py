"""Federated (2-site deployment on 127.0.0.1) vs central wall time for the same local steps, and bytes per site per round."""
from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file

from client.federated import site_dataset
from client.site import DEFAULT_LAUNCHER
from client.trainer import TrainSettings, train_steps
from server.registry import Registry
from shared_models.batch import collate
from shared_models.config import compose
from shared_models.factory import create_model
from shared_models.transfer import decode_arrays, encode_arrays
from simulations.deployment import Deployment, phantom_site_fields


def _epoch(moment) -> float:
    return moment.replace(tzinfo=timezone.utc).timestamp()


def federated(folder: Path, sites: dict, overrides: str, timeout_s: float = 3600) -> dict:
    """One run on a fresh deployment; wall time from `flwr run` to the registry's record of the run's end."""
    with Deployment(folder / "deployment", list(sites), site_fields=sites, database=False) as dep:
        registry = Registry(folder / "runs" / "registry.sqlite")
        submitted = time.time()
        run_id = dep.submit(f"{overrides} federation.run_name=bench federation.output_dir={folder / 'runs'}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                shown = registry.describe("bench")
            except KeyError:
                shown = None
            if shown and shown["run"]["status"] != "running":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the benchmark run did not finish within {timeout_s} s")
            time.sleep(0.2)
        ended = time.time()
        record = dep.wait(run_id, timeout_s=120)
    if record["status"] != "finished:completed" or shown["run"]["status"] != "finished":
        raise RuntimeError(f"the benchmark run failed: {record['status']} {shown['run'].get('error')}\n{record['logs'][-3000:]}")
    return {"wall_s": ended - submitted, "started": _epoch(shown["run"]["started_at"]) - submitted,
            "rounds": shown["rounds"], "site_metrics": shown["site_metrics"],
            "params": load_file(folder / "runs" / "bench" / "checkpoint" / "model.safetensors")}


def central(cfg, sites: dict, steps: int, threads: int) -> dict:
    """The same number of optimizer steps in one process over the union of the sites' data."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = create_model(cfg, seed=int(cfg.seed))
    union = dict(next(iter(sites.values())), name="central", studies=[s for site in sites.values() for s in site["studies"]])
    dataset = site_dataset(union, cfg)
    settings = TrainSettings.from_config(cfg.train, steps=steps, seed=int(cfg.seed), start_step=0, total_steps=steps)
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
    trained = train_steps(model, dataset, collate_fn, settings, progress=False, description="central")
    return {"wall_s": time.perf_counter() - started, "train_s": trained.seconds}


def serialisation_seconds(params: dict[str, np.ndarray], repeats: int = 5) -> float:
    """Median time to turn the shared parameters into a message's ArrayRecord and back (one direction each)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})
        {k: a.numpy() for k, a in record.items()}
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def wire_bytes(params: dict[str, np.ndarray], dtype: str) -> int:
    """Bytes of the message's ArrayRecord for these parameters sent as `dtype` (what the registry counts)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encode_arrays(params, dtype).items()}).count_bytes()


def run(quick: bool = False) -> dict:
    # 360 local steps at batch 4 are 60-70 s of training per site on an idle 2-core machine (180 took 33-36 s):
    # the condition ("rounds of at least 60 s of local work"), under which the per-round overhead is judged.
    rounds, local_steps = (2, 2) if quick else (3, 360)
    overrides = (f"model=tiny objective=hybrid federation.rounds={rounds} federation.local_steps={local_steps} "
                 "train.batch_size=4 federation.min_sites=2 federation.poll_s=0.2")
    cfg = compose(overrides.split())
    with tempfile.TemporaryDirectory(prefix="fedcxr-bench-") as tmp:
        folder = Path(tmp)
        sites = phantom_site_fields(folder / "phantom")
        fed = federated(folder, sites, overrides)
        total_steps = rounds * local_steps * len(sites)
        cen = central(cfg, sites, total_steps, threads=len(sites))  # the sites' cores: one thread each

    params = fed["params"]
    shared_bytes = sum(v.nbytes for v in params.values())
    rounds_done = [r for r in fed["rounds"] if r["status"] == "complete"]
    received = [r["bytes_received"] / r["sites_accepted"] for r in rounds_done]
    sent = [r["bytes_sent"] / r["sites_asked"] for r in rounds_done]
    round_seconds = [r["seconds"] for r in rounds_done]
    def slowest(metric: str) -> dict[int, float]:
        """Per round, the slowest site's `metric` (the round waits for it)."""
        return {r["round"]: max(m["metrics"].get(metric, float("nan")) for m in fed["site_metrics"] if m["round"] == r["round"])
                for r in rounds_done}

    site_train, site_setup, site_startup = slowest("seconds"), slowest("setup_s"), slowest("startup_s")
    float16 = wire_bytes(params, "float16")
    restored = decode_arrays(encode_arrays(params, "float16"))
    return {
        "wall_ratio_fed_vs_central": round(fed["wall_s"] / cen["wall_s"], 3),
        "bytes_per_round_over_shared": round(statistics.mean(received) / shared_bytes, 4),
        "bytes_per_round_over_shared_16bit": round(float16 / shared_bytes, 4),
        "round_seconds": round(statistics.median(round_seconds), 2),
        "detail": {
            "rounds": rounds, "local_steps": local_steps, "sites": len(sites), "total_steps": total_steps,
            "federated_wall_s": round(fed["wall_s"], 2), "central_wall_s": round(cen["wall_s"], 2),
            "central_train_s": round(cen["train_s"], 2),
            # where the federated time goes
            "start_up_s": round(fed["started"], 2),                           # flwr run + SuperExec starting the ServerApp
            "server_setup_s": round(fed["wall_s"] - fed["started"] - sum(round_seconds), 2),  # model build, waits, finish
            "round_s": [round(s, 2) for s in round_seconds],
            "site_train_s": [round(site_train[r["round"]], 2) for r in rounds_done],
            "round_overhead_s": [round(r["seconds"] - site_train[r["round"]], 2) for r in rounds_done],
            # the overhead split: the per-message ClientApp process (a fork of the site's warm launcher: bundle
            # install, app import, until the handler runs), the site's set-up
            # (model build, local state, data), and the rest (SuperNode polling, transfer, ServerApp checks)
            "site_startup_s": [round(site_startup[r["round"]], 2) for r in rounds_done],
            "site_setup_s": [round(site_setup[r["round"]], 2) for r in rounds_done],
            "round_rest_s": [round(r["seconds"] - site_startup[r["round"]] - site_setup[r["round"]] - site_train[r["round"]], 2)
                             for r in rounds_done],
            "serialisation_s_per_message": round(serialisation_seconds(params), 4),
            "shared_bytes": shared_bytes,
            "bytes_per_site_per_round_received": round(statistics.mean(received)),
            "bytes_per_site_per_round_sent": round(statistics.mean(sent)),
            "float16_wire_bytes": float16,
            "float16_max_abs_error": float(max(np.abs(restored[k].astype(np.float64) - params[k]).max()
                                              for k in params if np.issubdtype(params[k].dtype, np.floating))),
            "federated_wall_s_includes": "flwr run (bundle + upload), ServerApp and per-message ClientApp processes",
            "clientapp_launcher": DEFAULT_LAUNCHER,  # the benchmark's site files leave it unset
        },
    }
