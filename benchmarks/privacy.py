"""DP-SGD step time over the non-DP step of the same model (GroupNorm, `hybrid`) on the same batch."""
from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from benchmarks.common import all_terms_step, build, synthetic_samples, time_train_step
from client.privacy.clipping import ClipNorms, clipped_gradient_sum, per_study_method, trainable_parameters
from client.privacy.training import noisy_gradient
from shared_models.batch import collate

MODELS = {"tiny": 8, "resnet50_bert": 8}  # model -> batch size (patients per step), as in `objectives`


def dp_step_seconds(model, samples: list[dict], collate_fn, step: int, repeats: int, warmup: int = 1,
                    per_study: str = "auto") -> float:
    """Median wall seconds of one DP-SGD step: the clipped sum S(B) (the per-patient terms' per-study gradients
    in one vmapped pass, or one pass per patient with per_study="loop"; one batch pass for the coupled terms),
    Gaussian noise, AdamW."""
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        summed = clipped_gradient_sum(model, samples, collate_fn, step, ClipNorms(1.0, 1.0), len(samples), params,
                                      per_study=per_study)
        for param, grad in zip(params, noisy_gradient(summed.gradient, 1.0, len(samples), generator)):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    results: dict = {}
    for model_name, batch_size in MODELS.items():
        cfg, model = build(model_name, "hybrid", ["privacy=dpsgd"])   # GroupNorm: what DP-SGD trains
        samples = synthetic_samples(batch_size, int(cfg.model.image.img_size))
        collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
        step = all_terms_step(cfg)
        plain, _ = time_train_step(model, collate_fn(samples), step, repeats)
        seconds = {method: dp_step_seconds(model, samples, collate_fn, step, repeats, per_study=method)
                   for method in ("vmap", "loop")}
        chosen = per_study_method(model, "auto")
        results[model_name] = {"dp_step_s": round(seconds[chosen], 4), "step_s": round(plain, 4),
                               "ratio": round(seconds[chosen] / plain, 3), "batch_size": batch_size,
                               "per_study": chosen,
                               **{f"{method}_ratio": round(s / plain, 3) for method, s in seconds.items()}}
        del model
    results["method"] = ("the per-patient terms' per-study gradients in one torch.func.vmap pass (vmap_ratio) or one "
                         "pass per patient (loop_ratio), + one clipped batch pass for the coupled terms; ratio: the "
                         "method privacy.dpsgd.per_study=auto picks for the model (docs/privacy.md); AdamW after the "
                         "noise in both")
    results["threads"] = torch.get_num_threads()
    return results
