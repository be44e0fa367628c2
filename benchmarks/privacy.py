"""DP-SGD step time over the non-DP step of the same model (GroupNorm, `hybrid`) on the same batch."""
from __future__ import annotations

from functools import partial

import torch

from benchmarks.common import (all_terms_step, build, interleaved, median_seconds, ratio_to, synthetic_samples,
                               train_step)
from client.privacy.clipped_sum import clipped_gradient_sum, per_study_method, trainable_parameters
from client.privacy.clipping import ClipNorms
from client.privacy.training import noisy_gradient
from client.trainer import build_optimizer
from shared_models.batch import collate

# model -> batch size (patients per step), as in `objectives`; tiny_cnn: what `make simulate` and the sweep train
MODELS = {"tiny": 8, "resnet50_bert": 8, "tiny_cnn": 8}
METHODS = ("vmap", "loop")


def dp_step(model, samples: list[dict], collate_fn, step: int, params, optimizer, generator, per_study: str) -> None:
    """One DP-SGD step: the clipped sum S(B) (the per-patient terms' per-study gradients in one vmapped pass, or
    one pass per patient with per_study="loop"; the coupled terms clipped as one batch gradient), Gaussian
    noise, AdamW."""
    summed = clipped_gradient_sum(model, samples, collate_fn, step, ClipNorms(1.0, 1.0), len(samples), params,
                                  per_study=per_study)
    for param, grad in zip(params, noisy_gradient(summed.gradient, 1.0, len(samples), generator)):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_ratios(model, samples: list[dict], collate_fn, step: int, repeats: int, warmup: int = 1) -> dict:
    """The non-DP step and each DP method's step, timed in turn within every repeat (`interleaved`); per method,
    the median over repeats of its DP/non-DP ratio within a repeat, wall and CPU."""
    params = trainable_parameters(model)
    plain_optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)
    dp_optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batch = collate_fn(samples)
    model.train()
    steps = {"plain": lambda: train_step(model, batch, step, plain_optimizer)}
    for method in METHODS:
        steps[method] = partial(dp_step, model, samples, collate_fn, step, params, dp_optimizer, generator, method)
    times = interleaved(steps, repeats, warmup)
    out = {"step_s": median_seconds(times["plain"])[0]}
    for method in METHODS:
        out[f"{method}_step_s"] = median_seconds(times[method])[0]
        out.update({f"{method}_{key}": value for key, value in ratio_to(times, method, "plain").items()})
    return out


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 5
    results: dict = {}
    for model_name, batch_size in MODELS.items():
        cfg, model = build(model_name, "hybrid", ["privacy=dpsgd"])   # GroupNorm: what DP-SGD trains
        samples = synthetic_samples(batch_size, int(cfg.model.image.img_size))
        collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
        measured = step_ratios(model, samples, collate_fn, all_terms_step(cfg), repeats)
        chosen = per_study_method(model, "auto")
        results[model_name] = {"dp_step_s": measured[f"{chosen}_step_s"], "step_s": measured["step_s"],
                               "ratio": measured[f"{chosen}_ratio"], "cpu_ratio": measured[f"{chosen}_cpu_ratio"],
                               "ratio_range": measured[f"{chosen}_ratio_range"], "batch_size": batch_size,
                               "per_study": chosen, "repeats": repeats,
                               **{k: v for k, v in measured.items() if k.endswith(("_ratio", "_ratio_range"))}}
        del model
    results["method"] = ("the per-patient terms' per-study gradients in one torch.func.vmap pass (vmap_ratio) or one "
                         "pass per patient (loop_ratio: as many patients at once as CPU threads, one thread each; its coupled "
                         "terms reuse those passes' encodings), + the "
                         "coupled terms' batch gradient clipped as one; ratio: the method privacy.dpsgd.per_study=auto "
                         "picks for the model (docs/privacy.md); AdamW after the noise in both; the non-DP and DP "
                         "steps timed in turn within each repeat, ratio = median over repeats of the ratio within one, "
                         "ratio_range its min and max, cpu_ratio the same for process CPU seconds")
    results["threads"] = torch.get_num_threads()
    return results
