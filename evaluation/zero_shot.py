"""Zero-shot classification: image embeddings against positive and negative prompt embeddings per label."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from evaluation.metrics import accuracy_at, f1_at, roc_auc

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "eval" / "zero_shot.yaml"
EncodeText = Callable[[list[str]], "torch.Tensor | np.ndarray"]   # K prompts -> [K, D]


@dataclass(frozen=True)
class Prompts:
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def load_prompts(path: Path = DEFAULT_PROMPTS) -> tuple[dict[str, Prompts], float]:
    """(prompts by label, softmax temperature) from a YAML file shaped like configs/eval/zero_shot.yaml."""
    config = yaml.safe_load(Path(path).read_text())
    prompts = {}
    for label, pair in config["prompts"].items():
        if not pair.get("positive") or not pair.get("negative"):
            raise ValueError(f"{path}: label {label!r} needs at least one positive and one negative prompt")
        prompts[label] = Prompts(tuple(pair["positive"]), tuple(pair["negative"]))
    return prompts, float(config.get("temperature", 0.07))


def prompt_embeddings(encode_text: EncodeText, prompts: dict[str, Prompts], names: Sequence[str]):
    """([K, D] positive, [K, D] negative): each the re-normalised mean of its normalised prompt embeddings."""
    missing = [n for n in names if n not in prompts]
    if missing:
        raise KeyError(f"no zero-shot prompts for {missing}; add them to configs/eval/zero_shot.yaml")
    texts, owner = [], []
    for k, name in enumerate(names):
        for side, sentences in ((0, prompts[name].positive), (1, prompts[name].negative)):
            texts += sentences
            owner += [(k, side)] * len(sentences)
    embedded = encode_text(texts)
    embedded = embedded.detach().float().cpu() if isinstance(embedded, torch.Tensor) else torch.as_tensor(
        np.ascontiguousarray(embedded, dtype=np.float32))
    embedded = F.normalize(embedded, dim=-1)
    if embedded.shape[0] != len(texts):
        raise ValueError(f"encode_text returned {embedded.shape[0]} embeddings for {len(texts)} prompts")
    sums = torch.zeros(2, len(names), embedded.shape[1])
    for row, (k, side) in zip(embedded, owner):
        sums[side, k] += row
    return F.normalize(sums[0], dim=-1), F.normalize(sums[1], dim=-1)


def zero_shot_scores(image_embeddings, encode_text: EncodeText, prompts: dict[str, Prompts], names: Sequence[str],
                     temperature: float = 0.07) -> np.ndarray:
    """[N, K] probability of each label: softmax over (positive, negative) cosine similarity / temperature.

    The 0.5 threshold is where the image is closer to the positive than the negative prompts, so
    F1 and accuracy do not depend on the temperature; AUC does not either."""
    image = F.normalize(torch.as_tensor(np.ascontiguousarray(image_embeddings, dtype=np.float32)), dim=-1)
    positive, negative = prompt_embeddings(encode_text, prompts, names)
    if image.shape[1] != positive.shape[1]:
        raise ValueError(f"image embeddings have {image.shape[1]} dims, prompt embeddings {positive.shape[1]}")
    return torch.sigmoid((image @ positive.T - image @ negative.T) / temperature).numpy()


def evaluate_zero_shot(scores, labels, names: Sequence[str], threshold: float = 0.5) -> dict:
    """Contract JSON: mean_auc, f1 and accuracy (macro means over labels), per_label {auc, f1, accuracy},
    skipped {label: reason} for labels with one class (or none) among the labelled images."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    per_label, skipped = {}, {}
    for k, name in enumerate(names):
        known = ~np.isnan(labels[:, k])
        y, s = labels[known, k], scores[known, k]
        auc = roc_auc(y, s) if known.any() else math.nan
        if math.isnan(auc):
            skipped[name] = f"one class only among {int(known.sum())} labelled images"
            continue
        per_label[name] = {"auc": auc, "f1": f1_at(y, s, threshold), "accuracy": accuracy_at(y, s, threshold)}
    macro = {m: float(np.mean([v[m] for v in per_label.values()])) if per_label else math.nan
             for m in ("auc", "f1", "accuracy")}
    return {"mean_auc": macro["auc"], "f1": macro["f1"], "accuracy": macro["accuracy"],
            "per_label": per_label, "skipped": skipped, "threshold": threshold}
