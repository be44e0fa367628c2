"""`python -m evaluation.run checkpoint=PATH|random task=... data=...`: evaluate one checkpoint's encoders downstream."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from evaluation.benchmarks import load_benchmark
from evaluation.data import EvalSet, attach_masks, load_split, prepare_catalog, use_truth_labels
from evaluation.linear_probe import ProbeSettings, probe_targets, run_linear_probe
from evaluation.report import TASKS, plot_dice_histogram, plot_overlays, plot_roc_curves, write_results
from evaluation.retrieval import evaluate_retrieval
from evaluation.segmentation import SegmentationSettings, run_segmentation
from evaluation.zero_shot import evaluate_zero_shot, load_prompts, zero_shot_scores
from shared_models.vocab import CHEXPERT_LABELS

log = logging.getLogger("evaluation")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Pyramid(nn.Module):
    """The image encoder seen as a pyramid function (an nn.Module, so segmentation can fine-tune it)."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.image_encoder(images).pyramid


def load_model(cfg: DictConfig, model_given: bool = True):
    """(model, name, model config): the checkpoint's model and the `model` config it was built from (meta.json), or
    for `random` the configured model untrained (seeded).

    `model_given` says whether cfg.model is a choice someone made (`model=` on the command line, or the run a
    random encoder is compared with) rather than config.yaml's default: `random` needs one, and a checkpoint
    refuses one that names another model."""
    from shared_models.checkpoint import load_checkpoint
    from shared_models.factory import create_model

    if str(cfg.checkpoint) == "random":
        if not model_given:
            raise ValueError("checkpoint=random needs model=NAME: the untrained floor must be the architecture of the "
                             "checkpoint it is compared with (e.g. model=tiny_cnn for make simulate's runs; a "
                             "checkpoint's is in its meta.json under config.model.name)")
        torch.manual_seed(cfg.seed)
        return create_model(cfg).eval(), "random", cfg.model
    model, meta = load_checkpoint(cfg.checkpoint)   # raises CheckpointError naming what is wrong
    stored = OmegaConf.create(meta["config"]["model"])
    if model_given and str(cfg.model.get("name")) != str(stored.get("name")):
        raise ValueError(f"checkpoint {cfg.checkpoint} holds model {stored.get('name')!r} (its meta.json), not "
                         f"model={cfg.model.get('name')}; leave model= out (the checkpoint's own config is used) or "
                         "name the checkpoint that was trained with it")
    return model.eval(), str(cfg.checkpoint), stored


def model_given_on_command_line() -> bool:
    """Whether `model=NAME` was given to this Hydra app (a `model.key=value` alone names no architecture)."""
    from hydra.core.hydra_config import HydraConfig

    return any(o.lstrip("+").split("=", 1)[0] == "model" for o in HydraConfig.get().overrides.task)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def text_encoder_fn(model, max_length: int) -> Callable[[list[str]], torch.Tensor]:
    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        tokens = model.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    return encode


def probe_label_names(cfg: DictConfig) -> list[str]:
    """probe.labels, else the data config's `labels` list (a manifest's label columns); empty: every binary
    label with both classes in both splits."""
    data_labels = cfg.data.get("labels")   # a benchmark's `labels` is its labels file, not a list
    return list(cfg.probe.labels or (data_labels if OmegaConf.is_list(data_labels) else []))


def columns(labels: np.ndarray, names: list[str]) -> np.ndarray:
    return labels[:, [CHEXPERT_LABELS.index(n) for n in names]]


# ------------------------------------------------------------------------------------------ tasks
def linear_probe_task(model, train: EvalSet, test: EvalSet, cfg: DictConfig, run_dir: Path) -> dict:
    # Any label column (CheXpert names or a manifest's own, e.g. covid); stops naming the column and its counts
    targets = probe_targets(train, test, probe_label_names(cfg), cfg.uncertain)
    train, test = train.rows(targets.train_rows), test.rows(targets.test_rows)
    names, multiclass, train_y, test_y = targets.names, targets.multiclass, targets.train_y, targets.test_y

    def features(images: torch.Tensor) -> torch.Tensor:   # the backbone's pooled features, as MGCA probes them
        return model.image_encoder(images).global_emb

    settings = ProbeSettings(l2=cfg.probe.l2, max_iter=cfg.probe.max_iter, balanced=cfg.probe.balanced)
    results, scores = run_linear_probe(batched(features, train.images), train_y, train.patient_ids,
                                       batched(features, test.images), test_y, names, list(cfg.label_fraction),
                                       list(range(cfg.seeds)), multiclass=multiclass, settings=settings)
    for fraction, fraction_scores in scores.items():
        plot_roc_curves(run_dir / f"roc_linear_probe_{fraction}.png",
                        np.eye(len(names))[test_y] if multiclass else test_y, fraction_scores,
                        names, title=f"linear probe, {fraction} of training patients (seed 0)")
    return results


def zero_shot_task(model, train: EvalSet, test: EvalSet, cfg: DictConfig, run_dir: Path) -> dict:
    prompts, temperature = load_prompts(PROJECT_ROOT / cfg.zero_shot.prompts)
    names = [n for n in CHEXPERT_LABELS if n in prompts]
    scores = zero_shot_scores(batched(model.encode_image, test.images), text_encoder_fn(model, cfg.model.text.max_length),
                              prompts, names, temperature)
    labels = columns(test.labels, names)
    plot_roc_curves(run_dir / "roc_zero_shot.png", labels, scores, names, title="zero-shot")
    return evaluate_zero_shot(scores, labels, names, cfg.zero_shot.threshold)


def segmentation_task(model, train: EvalSet, test: EvalSet, cfg: DictConfig, run_dir: Path) -> dict:
    train, test = train.with_masks(), test.with_masks()   # a blank mask_path is no mask, not an empty one
    seg = cfg.segmentation
    settings = SegmentationSettings(epochs=seg.epochs, batch_size=seg.batch_size, lr=seg.lr, width=seg.width,
                                    bce_weight=seg.bce_weight, threshold=seg.threshold, fine_tune=seg.fine_tune,
                                    encoder_lr=seg.encoder_lr)
    pyramid = Pyramid(model.image_encoder)
    results, details = run_segmentation(
        pyramid, model.image_encoder.pyramid_channels, train.images, torch.as_tensor(train.masks[:, None]).float(),
        train.patient_ids, test.images, test.masks, list(cfg.label_fraction), list(range(cfg.seeds)), settings)
    for fraction, detail in details.items():
        plot_dice_histogram(run_dir / f"dice_{fraction}.png", detail["dice"],
                            title=f"Dice per image, {fraction} of training patients (seed 0)")
        plot_overlays(run_dir / f"overlays_{fraction}.png", test.images.numpy(), test.masks, detail["probabilities"],
                      count=seg.overlays, threshold=seg.threshold)
    return results


def retrieval_task(model, train: EvalSet, test: EvalSet, cfg: DictConfig, run_dir: Path) -> dict:
    rows = test.one_per_study()
    images = batched(model.encode_image, test.images[torch.as_tensor(rows)])
    texts = text_encoder_fn(model, cfg.model.text.max_length)([test.reports[i] for i in rows]).numpy()
    return evaluate_retrieval(images, texts, tuple(cfg.retrieval.ks))


TASK_RUNNERS = {"linear_probe": linear_probe_task, "zero_shot": zero_shot_task,
                "segmentation": segmentation_task, "retrieval": retrieval_task}


def catalog_splits(cfg: DictConfig, size: int, masks: bool) -> tuple[EvalSet, EvalSet]:
    """`eval_split.train` and `.test` of an indexed collection (phantom, MIMIC-CXR, manifest)."""
    catalog, cache = prepare_catalog(cfg.data)
    train = load_split(catalog, cache, cfg.eval_split.train, size, cfg.uncertain)
    test = load_split(catalog, cache, cfg.eval_split.test, size, cfg.uncertain)
    if Path(cfg.data.root, "ground_truth.json").is_file():
        for split in (train, test):   # the phantom's true labels, not those its reports state
            use_truth_labels(split, Path(cfg.data.root))
    if masks:
        for split in (train, test):
            attach_masks(split, cfg.data, catalog, cfg.segmentation.target)
    return train, test


def evaluate(cfg: DictConfig, run_dir: Path, data_name: str | None = None, model_given: bool = True) -> dict:
    """Run the configured task(s) and write results.json, results.md and the plots into run_dir.

    `data_name` is what results.json calls the data (the Hydra `data=` choice); default the layout.
    `model_given`: cfg.model was chosen (see load_model), as a caller such as simulations.run chooses its run's."""
    tasks = list(TASKS) if cfg.task == "all" else [cfg.task]
    unknown = [t for t in tasks if t not in TASK_RUNNERS]
    if unknown:
        raise ValueError(f"task={cfg.task!r} is not one of {sorted(TASK_RUNNERS)} or 'all'")
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return _evaluate(cfg, tasks, run_dir, data_name, model_given)
    finally:
        # A caller that trains next (simulations.run's centralized baseline) must get its cores back.
        torch.set_num_threads(threads)


def _evaluate(cfg: DictConfig, tasks: list[str], run_dir: Path, data_name: str | None, model_given: bool) -> dict:
    model, name, model_cfg = load_model(cfg, model_given)
    cfg = cfg.copy()
    cfg.model = model_cfg   # a checkpoint's own model config (text length, image size) wins over the command line's
    size = model.image_encoder.img_size
    if cfg.data.get("benchmark"):   # a public benchmark in its own files: no catalog
        if "retrieval" in tasks:
            raise ValueError(f"task={cfg.task}: retrieval needs reports, and data.benchmark={cfg.data.benchmark} has "
                             "none; choose linear_probe, zero_shot or segmentation")
        train, test = load_benchmark(cfg.data, size, cfg.uncertain, masks="segmentation" in tasks)
    else:
        train, test = catalog_splits(cfg, size, masks="segmentation" in tasks)
    if tasks == ["segmentation"]:   # `images` then counts what it uses: the images with a mask
        train, test = train.with_masks(), test.with_masks()
    shared = set(train.patient_ids) & set(test.patient_ids)
    if shared:
        raise ValueError(f"the train and test splits share {len(shared)} patients; choose disjoint splits")
    results = {"checkpoint": name, "data": data_name or str(cfg.data.get("benchmark") or cfg.data.layout),
               "images": {"train": len(train), "test": len(test)}, "seconds": {}}
    for task in tasks:
        start = time.perf_counter()
        results[task] = TASK_RUNNERS[task](model, train, test, cfg, run_dir)
        results["seconds"][task] = round(time.perf_counter() - start, 2)
        log.info("%s done in %.1f s", task, results["seconds"][task])
    write_results(run_dir, results)
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    evaluate(cfg, run_dir, data_name=hydra_cfg.runtime.choices.get("data"), model_given=model_given_on_command_line())
    print((run_dir / "results.md").read_text())
    print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
