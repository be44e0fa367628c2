"""Writes an evaluation's results.json (contract keys), a markdown table and PNG plots into its run directory."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from evaluation.metrics import roc_auc, roc_curve

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
TASKS = ("linear_probe", "zero_shot", "segmentation", "retrieval")


def check_results(results: Mapping) -> None:
    """Raise ValueError naming the first contract key (docs/contracts.md) that results lacks."""
    def need(mapping, keys, where):
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ValueError(f"results.json {where} lacks {missing} required by the evaluation contract")

    need(results, ("checkpoint", "data"), "top level")
    if not any(task in results for task in TASKS):
        raise ValueError(f"results.json holds none of the tasks {TASKS}")
    for fraction, entry in results.get("linear_probe", {}).items():
        need(entry, ("mean_auc", "per_label"), f"linear_probe[{fraction}]")
        need(entry["mean_auc"], ("mean", "std", "per_seed"), f"linear_probe[{fraction}].mean_auc")
        for label, value in entry["per_label"].items():
            need(value, ("mean", "std"), f"linear_probe[{fraction}].per_label[{label}]")
    if "zero_shot" in results:
        need(results["zero_shot"], ("mean_auc", "f1", "accuracy", "per_label"), "zero_shot")
    for fraction, entry in results.get("segmentation", {}).items():
        for convention in ("dice_empty_as_one", "dice_empty_excluded"):
            need(entry, (convention,), f"segmentation[{fraction}]")
            need(entry[convention], ("mean", "std"), f"segmentation[{fraction}].{convention}")
    if "retrieval" in results:
        need(results["retrieval"], RETRIEVAL_KEYS, "retrieval")


def jsonable(value):
    """numpy scalars/arrays to Python, NaN and infinities to null (strict JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(entry) -> str:
    if isinstance(entry, Mapping):
        mean, std = entry.get("mean"), entry.get("std")
        return "n/a" if mean is None or math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"
    return "n/a" if entry is None or math.isnan(entry) else f"{entry:.3f}"


def markdown_table(results: Mapping) -> str:
    """Human-readable summary, one table per task run."""
    lines = [f"# Evaluation of `{results['checkpoint']}` on `{results['data']}`", ""]
    if "linear_probe" in results:
        lines += ["## Linear probe (mean ± std over seeds)", "", "| label fraction | mean AUC | accuracy |",
                  "|---|---|---|"]
        for fraction, entry in results["linear_probe"].items():
            lines.append(f"| {fraction} | {_fmt(entry['mean_auc'])} | {_fmt(entry['accuracy']) if 'accuracy' in entry else '-'} |")
        lines.append("")
    if "segmentation" in results:
        lines += ["## Segmentation Dice (mean ± std over seeds)", "",
                  "| label fraction | empty-vs-empty = 1 | empty truth excluded |", "|---|---|---|"]
        for fraction, entry in results["segmentation"].items():
            lines.append(f"| {fraction} | {_fmt(entry['dice_empty_as_one'])} | {_fmt(entry['dice_empty_excluded'])} |")
        lines.append("")
    if "zero_shot" in results:
        z = results["zero_shot"]
        lines += ["## Zero-shot", "", "| mean AUC | F1 | accuracy |", "|---|---|---|",
                  f"| {_fmt(z['mean_auc'])} | {_fmt(z['f1'])} | {_fmt(z['accuracy'])} |", ""]
    if "retrieval" in results:
        r = results["retrieval"]
        lines += ["## Retrieval (Recall@K)", "", "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|",
                  f"| image -> report | {_fmt(r['i2t_r1'])} | {_fmt(r['i2t_r5'])} | {_fmt(r['i2t_r10'])} |",
                  f"| report -> image | {_fmt(r['t2i_r1'])} | {_fmt(r['t2i_r5'])} | {_fmt(r['t2i_r10'])} |", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc_curves(path: Path, labels, scores, names: Sequence[str], title: str = "ROC") -> Path:
    """One ROC curve per label with both classes among its labelled rows (NaN labels masked)."""
    plt = _pyplot()
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)   # 14 CheXpert labels: no repeated colours
    for k, name in enumerate(names):
        known = ~np.isnan(labels[:, k])
        y, s = labels[known, k], scores[known, k]
        auc = roc_auc(y, s) if known.any() else math.nan
        if not math.isnan(auc):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no label has both classes\nin the evaluation set", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_dice_histogram(path: Path, dice: Mapping[str, np.ndarray], title: str = "Dice per image") -> Path:
    """Histogram of per-image Dice for each convention (NaN = excluded image, left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for convention, values in dice.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[~np.isnan(values)]
        ax.hist(values, bins=np.linspace(0, 1, 21), alpha=0.5, label=f"{convention} (n={len(values)})")
    ax.set(xlabel="Dice", ylabel="images", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_overlays(path: Path, images, truths, probabilities, count: int = 4, threshold: float = 0.5) -> Path:
    """A row of images with the true mask (green) and the predicted mask (red) as translucent fills."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    green, red = ListedColormap(["#00c000"]), ListedColormap(["#ff2020"])
    images = np.asarray(images).reshape(len(images), *np.asarray(images).shape[-2:])
    truths = np.asarray(truths).reshape(images.shape).astype(bool)
    preds = np.asarray(probabilities).reshape(images.shape) >= threshold
    # Prefer images that have something to show (non-empty truth), then the rest.
    order = np.r_[np.flatnonzero(truths.any(axis=(1, 2))), np.flatnonzero(~truths.any(axis=(1, 2)))][:count]
    fig, axes = plt.subplots(1, max(len(order), 1), figsize=(3 * max(len(order), 1), 3), squeeze=False)
    for ax, i in zip(axes[0], order):
        ax.imshow(images[i], cmap="gray")
        ax.imshow(np.ma.masked_where(~truths[i], truths[i]), cmap=green, alpha=0.4)
        ax.imshow(np.ma.masked_where(~preds[i], preds[i]), cmap=red, alpha=0.4)
        ax.set_title(f"test image {i}: truth green, prediction red", fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_results(run_dir: Path, results: Mapping) -> tuple[Path, Path]:
    """Check the contract, then write results.json and results.md into run_dir; returns their paths."""
    check_results(results)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "results.json", run_dir / "results.md"
    json_path.write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown_table(results) + "\n")
    return json_path, md_path
