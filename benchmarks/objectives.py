"""Training-step time of every objective preset relative to `clip` with the same encoders, and parameter counts."""
from __future__ import annotations

from functools import partial

import torch

from benchmarks.common import all_terms_step, build, interleaved, make_batch, median_seconds, ratio_to, train_step
from client.trainer import build_optimizer
from shared_models.sharing import shared_parameter_names, sharing_settings

PRESETS = ["clip", "hybridmed", "asg", "g2d", "hybrid"]
MODELS = {"tiny": 8, "resnet50_bert": 8}  # model -> batch size (each at its configured image size)


def component_params(model, cfg) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        component = name.split(".")[0] if not name.startswith("objectives.") else ".".join(name.split(".")[:2])
        counts[component] = counts.get(component, 0) + param.numel()
    shared = set(shared_parameter_names(model, **sharing_settings(cfg)))
    counts["shared"] = sum(p.numel() for n, p in model.named_parameters() if n in shared)
    counts["local_only"] = sum(p.numel() for n, p in model.named_parameters() if n not in shared)
    return counts


def run(quick: bool = False) -> dict:
    """Every preset of one model built side by side and timed in turn within each repeat (`interleaved`), so the
    ratios to `clip` are taken within a repeat and the machine's drift falls on all presets alike."""
    repeats = 2 if quick else 3
    results: dict = {"params": {}}
    for model_name, batch_size in MODELS.items():
        steps = {}
        for preset in PRESETS:
            cfg, model = build(model_name, preset)
            optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)
            model.train()
            steps[preset] = partial(train_step, model, make_batch(model, cfg, batch_size), all_terms_step(cfg),
                                    optimizer)
            if preset == "hybrid":
                results["params"][model_name] = component_params(model, cfg)
        times = interleaved(steps, repeats, warmup=2)
        del steps
        results[model_name] = {}
        for preset in PRESETS:
            seconds, cpu_seconds = median_seconds(times[preset])
            vs_clip = ratio_to(times, preset, "clip")
            results[model_name][preset] = {"step_s": seconds, "cpu_s": cpu_seconds, "ratio_vs_clip": vs_clip["ratio"],
                                           "cpu_ratio_vs_clip": vs_clip["cpu_ratio"],
                                           "ratio_range_vs_clip": vs_clip["ratio_range"]}
        results[model_name]["batch_size"] = batch_size
        results[model_name]["image_size"] = int(cfg.model.image.img_size)
    results["threads"] = torch.get_num_threads()
    return results
