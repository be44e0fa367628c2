"""Training-step time of every objective preset relative to `clip` with the same encoders, and parameter counts."""
from __future__ import annotations

import torch

from benchmarks.common import all_terms_step, build, make_batch, time_train_step
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
    repeats = 2 if quick else 3
    results: dict = {"params": {}}
    for model_name, batch_size in MODELS.items():
        results[model_name] = {}
        for preset in PRESETS:
            cfg, model = build(model_name, preset)
            batch = make_batch(model, cfg, batch_size)
            seconds, cpu_seconds = time_train_step(model, batch, all_terms_step(cfg), repeats)
            results[model_name][preset] = {"step_s": round(seconds, 4), "cpu_s": round(cpu_seconds, 4)}
            if preset == "hybrid":
                results["params"][model_name] = component_params(model, cfg)
            del model
        clip = results[model_name]["clip"]
        for preset in PRESETS:
            timing = results[model_name][preset]
            timing["ratio_vs_clip"] = round(timing["step_s"] / clip["step_s"], 3)
            timing["cpu_ratio_vs_clip"] = round(timing["cpu_s"] / clip["cpu_s"], 3)
        results[model_name]["batch_size"] = batch_size
        results[model_name]["image_size"] = int(cfg.model.image.img_size)
    results["threads"] = torch.get_num_threads()
    return results
