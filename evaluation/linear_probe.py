"""Linear probe on frozen features: class-balanced logistic regression (full-batch L-BFGS) per label set."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import multiclass_accuracy, per_label_auc, spread
from evaluation.sampling import sample_fraction

log = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    l2: float = 1e-2          # weight decay on the standardised-feature weights (not the bias)
    max_iter: int = 200       # L-BFGS iterations; convex problem, converges well within this
    balanced: bool = True     # weight each class so positives and negatives count equally


def standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Zero mean, unit variance with the training features' statistics, applied to every array."""
    x = torch.as_tensor(np.ascontiguousarray(train, dtype=np.float32))
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    return [(torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)) - mean) / std for a in (train, *others)]


def _minimise(params: list[torch.Tensor], loss_fn, max_iter: int) -> None:
    optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)


def fit_multilabel(x: torch.Tensor, y: np.ndarray, settings: ProbeSettings) -> torch.nn.Linear:
    """One logistic regression per column of y ([N, K], NaN = missing, left out of that column's loss)."""
    target = torch.as_tensor(np.nan_to_num(y, nan=0.0), dtype=torch.float32)
    known = torch.as_tensor(~np.isnan(y), dtype=torch.float32)
    n_known = known.sum(0).clamp_min(1)
    pos_share = (target * known).sum(0) / n_known
    if settings.balanced:
        # Each class gets half of the label's total weight; a label absent from a class keeps weight 0 there.
        weight = torch.where(target > 0, 0.5 / pos_share.clamp_min(1e-12), 0.5 / (1 - pos_share).clamp_min(1e-12))
    else:
        weight = torch.ones_like(target)
    weight = weight * known / n_known
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    def loss():
        bce = F.binary_cross_entropy_with_logits(head(x), target, reduction="none")
        return (weight * bce).sum() + 0.5 * settings.l2 * head.weight.pow(2).sum()

    _minimise(list(head.parameters()), loss, settings.max_iter)
    return head


def fit_multiclass(x: torch.Tensor, y: np.ndarray, n_classes: int, settings: ProbeSettings) -> torch.nn.Linear:
    """Softmax regression over integer classes y [N]."""
    target = torch.as_tensor(y, dtype=torch.long)
    counts = torch.bincount(target, minlength=n_classes).float()
    class_weight = (len(target) / (n_classes * counts.clamp_min(1))) if settings.balanced else torch.ones(n_classes)
    head = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    def loss():
        return F.cross_entropy(head(x), target, weight=class_weight) + 0.5 * settings.l2 * head.weight.pow(2).sum()

    _minimise(list(head.parameters()), loss, settings.max_iter)
    return head


def probe_multilabel(train_x, train_y, test_x, test_y, names: Sequence[str], settings: ProbeSettings = ProbeSettings()):
    """Train on (train_x, train_y), score test_x; returns {"mean_auc", "per_label", "skipped", "scores"}.

    A label with one class among the training rows cannot be learned and is skipped (with the
    reason), as is a label with one class in the test set."""
    train_y, test_y = np.asarray(train_y, dtype=np.float64), np.asarray(test_y, dtype=np.float64)
    xtr, xte = standardise(train_x, test_x)
    head = fit_multilabel(xtr, train_y, settings)
    with torch.no_grad():
        scores = torch.sigmoid(head(xte)).numpy()
    aucs, skipped = per_label_auc(test_y, scores, names)
    for k, name in enumerate(names):
        column = train_y[:, k][~np.isnan(train_y[:, k])]
        if len(np.unique(column)) < 2:
            aucs.pop(name, None)
            skipped[name] = f"one class only in the training sample ({int(column.sum())} positive of {len(column)})"
    mean_auc = float(np.mean(list(aucs.values()))) if aucs else math.nan
    return {"mean_auc": mean_auc, "per_label": aucs, "skipped": skipped, "scores": scores}


def probe_multiclass(train_x, train_y, test_x, test_y, classes: Sequence[str], settings: ProbeSettings = ProbeSettings()):
    """Softmax probe; returns {"accuracy", "mean_auc" (one-vs-rest, macro), "per_label", "skipped", "scores"}."""
    xtr, xte = standardise(train_x, test_x)
    head = fit_multiclass(xtr, np.asarray(train_y), len(classes), settings)
    with torch.no_grad():
        scores = torch.softmax(head(xte), dim=1).numpy()
    test_y = np.asarray(test_y)
    one_hot = (test_y[:, None] == np.arange(len(classes))[None, :]).astype(np.float64)
    aucs, skipped = per_label_auc(one_hot, scores, classes)
    mean_auc = float(np.mean(list(aucs.values()))) if aucs else math.nan
    return {"accuracy": multiclass_accuracy(test_y, scores), "mean_auc": mean_auc, "per_label": aucs,
            "skipped": skipped, "scores": scores}


def run_linear_probe(train_x, train_y, train_patients: Sequence[str], test_x, test_y, names: Sequence[str],
                     fractions: Sequence[float], seeds: Sequence[int], multiclass: bool = False,
                     settings: ProbeSettings = ProbeSettings()) -> tuple[dict, dict]:
    """Probe at each label fraction (patients sampled per seed) -> (contract JSON, seed-0 test scores per fraction).

    JSON per fraction (key `str(fraction)`): mean_auc {mean, std, per_seed}, per_label {label: {mean, std}},
    accuracy {mean, std, per_seed} for multi-class sets, train_images per seed, skipped {label: reason}."""
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    probe = probe_multiclass if multiclass else probe_multilabel
    results, first_scores = {}, {}
    for fraction in fractions:
        runs = []
        for seed in seeds:
            rows = sample_fraction(train_patients, fraction, seed)
            runs.append((len(rows), probe(train_x[rows], train_y[rows], test_x, test_y, names, settings)))
        first_scores[str(fraction)] = runs[0][1]["scores"]
        entry = {
            "mean_auc": spread([r["mean_auc"] for _, r in runs]),
            "per_label": {n: {k: v for k, v in spread([r["per_label"].get(n, math.nan) for _, r in runs]).items()
                              if k != "per_seed"} for n in names},
            "train_images": [n for n, _ in runs],
            "skipped": {n: why for _, r in runs for n, why in r["skipped"].items()},
        }
        if multiclass:
            entry["accuracy"] = spread([r["accuracy"] for _, r in runs])
        results[str(fraction)] = entry
    return results, first_scores



# ----------------------------------------------------------------------------- which labels to probe
@dataclass
class ProbeTargets:
    """What the probe learns: label names (or a multi-class column's classes), targets, and the rows used."""

    names: list[str]
    train_y: np.ndarray          # float [N, K] (NaN unknown) or, multi-class, int [N]
    test_y: np.ndarray
    multiclass: bool
    train_rows: np.ndarray       # rows of the train / test split the targets belong to
    test_rows: np.ndarray


# A label column written in words is binary too.
YES_NO = {"yes": 1.0, "true": 1.0, "positive": 1.0, "no": 0.0, "false": 0.0, "negative": 0.0}


def label_column(split, name: str, uncertain: str) -> list:
    """Per row of `split` (an EvalSet) the value of label `name`, None where unknown. CheXpert names come
    from the label matrix (uncertain already mapped; the phantom's truth), other columns from the
    manifest's own, with -1 mapped by the uncertain policy."""
    from evaluation.readers import uncertain_value
    from shared_models.vocab import CHEXPERT_LABELS

    if name in CHEXPERT_LABELS:
        return [None if math.isnan(v) else float(v) for v in split.labels[:, CHEXPERT_LABELS.index(name)]]
    values = [row.get(name) for row in split.label_values] if split.label_values else [None] * len(split)
    values = [YES_NO.get(v.casefold(), v) if isinstance(v, str) else v for v in values]
    values = [uncertain_value(v, uncertain) if isinstance(v, float) else v for v in values]
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def is_binary(values: list) -> bool:
    return all(isinstance(v, float) and v in (0.0, 1.0) for v in values if v is not None)


def class_name(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def counts_text(values: list) -> str:
    known = [v for v in values if v is not None]
    if is_binary(values):
        parts = [f"{sum(v == 1.0 for v in known)} positive", f"{sum(v == 0.0 for v in known)} negative"]
    else:
        tally: dict[str, int] = {}
        for v in known:
            tally[class_name(v)] = tally.get(class_name(v), 0) + 1
        parts = [f"{n} {c}" for c, n in sorted(tally.items())]
    return ", ".join(parts + [f"{len(values) - len(known)} unknown"])


def label_names_in(split) -> list[str]:
    """Every label the split carries a value for: CheXpert names, then a manifest's own columns."""
    from shared_models.vocab import CHEXPERT_LABELS

    own = sorted({k for row in split.label_values for k, v in row.items() if v is not None} - set(CHEXPERT_LABELS))
    return [n for k, n in enumerate(CHEXPERT_LABELS) if not np.all(np.isnan(split.labels[:, k]))] + own


def _classes(values: list) -> set:
    return {class_name(v) for v in values if v is not None}


def probe_targets(train, test, requested: Sequence[str] | None, uncertain: str) -> ProbeTargets:
    """The probe's targets for the requested labels (binary or multi-label columns, or one multi-class
    column), or, with none requested, every binary label with both classes in both splits.

    Blanks are unknown. A label with no value, or a split in which it has a single class, stops here
    with a message naming the column and its counts (an empty probe used to fail inside L-BFGS)."""
    if "classes" in train.meta:   # COVIDx: one class per image from its benchmark reader
        return ProbeTargets(list(train.meta["classes"]), train.meta["class_ids"], test.meta["class_ids"], True,
                            np.arange(len(train)), np.arange(len(test)))
    available = sorted(set(label_names_in(train)) | set(label_names_in(test)))
    columns = {}
    for name in list(requested or available):
        columns[name] = (label_column(train, name, uncertain), label_column(test, name, uncertain))

    def summary(name: str) -> str:
        tr, te = columns[name]
        return f"{name!r} (train: {counts_text(tr)}; test: {counts_text(te)})"

    if not requested:
        names = [n for n, (tr, te) in columns.items()
                 if is_binary(tr + te) and len(_classes(tr)) == 2 and len(_classes(te)) == 2]
        if not names:
            raise ValueError("linear probe: no label has both classes in both splits: "
                             + ("; ".join(summary(n) for n in columns) or "the data carries no label column")
                             + ". Name a label column with probe.labels=[...] (or data.labels)")
        return _known_rows(_matrix(columns, names, 0), _matrix(columns, names, 1), names)

    for name, (tr, te) in columns.items():
        if all(v is None for v in tr + te):
            raise ValueError(f"probe label {name!r}: no image of the train ({len(tr)}) or test ({len(te)}) split "
                             f"has a value; label columns here: {', '.join(available) or 'none'}")
        for split_name, values in (("train", tr), ("test", te)):
            if len(_classes(values)) < 2:
                raise ValueError(f"probe label {summary(name)}: the {split_name} split has "
                                 f"{'no' if not _classes(values) else 'one'} class only; a probe needs both "
                                 "(or for a multi-class column, at least two) in each split")
    for name in columns:
        log.info("probe label %s", summary(name))
    multiclass = [n for n, (tr, te) in columns.items() if not is_binary(tr + te)]
    if not multiclass:
        names = list(columns)
        return _known_rows(_matrix(columns, names, 0), _matrix(columns, names, 1), names)
    if len(columns) > 1:
        raise ValueError(f"probe labels {list(columns)}: {multiclass[0]!r} holds classes "
                         f"({', '.join(sorted(_classes(sum(columns[multiclass[0]], []))))}); probe a multi-class "
                         f"column alone: probe.labels=[{multiclass[0]}]")
    tr, te = columns[multiclass[0]]
    classes = sorted(_classes(tr) | _classes(te))
    train_rows = np.array([i for i, v in enumerate(tr) if v is not None], dtype=np.int64)
    test_rows = np.array([i for i, v in enumerate(te) if v is not None], dtype=np.int64)
    ids = lambda values, rows: np.array([classes.index(class_name(values[i])) for i in rows], dtype=np.int64)  # noqa: E731
    return ProbeTargets(classes, ids(tr, train_rows), ids(te, test_rows), True, train_rows, test_rows)


def _known_rows(train_y: np.ndarray, test_y: np.ndarray, names: list[str]) -> ProbeTargets:
    """Only the rows with at least one known label: a row with none adds nothing to the loss or the AUC,
    and `train_images` then counts the images the probe learns from."""
    rows = [np.flatnonzero(~np.isnan(y).all(axis=1)) for y in (train_y, test_y)]
    return ProbeTargets(list(names), train_y[rows[0]], test_y[rows[1]], False, rows[0], rows[1])


def _matrix(columns: dict, names: list[str], which: int) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in columns[n][which]] for n in names],
                    dtype=np.float64).T.reshape(-1, len(names))
