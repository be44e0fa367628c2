"""Loads an evaluation split through the client data layer into memory: images, labels, reports, masks."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sqlalchemy import select

from client.data.catalog import Image, open_catalog
from client.data.dataset import CxrDataset
from client.data.transforms import EvalTransform
from evaluation.readers import Mask, PngMask, read_phantom, uncertain_value

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """One split at the model's image size; row i of every field is the same image."""

    images: torch.Tensor                  # float32 [N, 1, S, S] in [0, 1]
    labels: np.ndarray                    # float32 [N, 14] CHEXPERT_LABELS order, NaN missing, uncertain mapped
    patient_ids: list[str]
    study_ids: list[str]
    image_ids: list[str]
    reports: list[str]
    masks: np.ndarray | None = None       # bool [N, S, S] for the segmentation target
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def one_per_study(self) -> np.ndarray:
        """Row of the first image of each study (retrieval pairs one image with its report)."""
        seen: dict[str, int] = {}
        for row, study in enumerate(self.study_ids):
            seen.setdefault(study, row)
        return np.array(sorted(seen.values()), dtype=np.int64)


def prepare_catalog(data_cfg) -> tuple[Path, Path]:
    """(catalog, cache) for `data_cfg`, indexing first (incremental: on an indexed folder this only
    checks sizes and times). A phantom is not generated here: evaluation sits below simulations."""
    from client.data.index import index_data
    from client.data.layouts import open_layout

    root = Path(data_cfg.root)
    if data_cfg.get("generate") and not (root / "ground_truth.json").is_file():
        raise FileNotFoundError(
            f"no phantom at {root}; generate it first: python -m simulations.phantom --out {root} "
            f"--studies {data_cfg.studies} --seed {data_cfg.phantom_seed} --held-out {data_cfg.get('held_out', 0.1)} "
            f"--size {data_cfg.get('image_height', 512)} "
            f"--finding-contrast {data_cfg.get('finding_contrast', 1.0)} "
            "(or train on it, which generates it)")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; point data.root at the dataset folder")
    options = {"manifest": data_cfg.manifest} if data_cfg.layout == "manifest" else {}
    layout = open_layout(data_cfg.layout, root, data_cfg.get("reports"), **options)
    views = list(data_cfg.views) if data_cfg.get("views") else None
    summary = index_data(layout, data_cfg.catalog, data_cfg.cache, views=views, max_pixels=data_cfg.max_pixels,
                         short_side=data_cfg.cache_short_side)
    if summary["indexed"]:
        log.info("indexed %d images (%s rejected)", summary["indexed"], summary["rejected"] or "none")
    return Path(data_cfg.catalog), Path(data_cfg.cache)


def load_split(catalog: Path, cache: Path, split: str | list[str], image_size: int, uncertain: str) -> EvalSet:
    """Every usable image of `split` (one name or several) through the evaluation transform, labels
    mapped by the uncertain policy."""
    split = split if isinstance(split, str) else list(split)
    dataset = CxrDataset(catalog, cache, split=split, image_size=image_size)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {catalog} has no usable images; check the split names in the data")
    samples = [dataset[i] for i in range(len(dataset))]
    labels = torch.stack([s["labels"] for s in samples]).numpy().astype(np.float32)
    labels[labels == -1] = uncertain_value(-1.0, uncertain)
    return EvalSet(
        images=torch.stack([s["image"] for s in samples]),
        labels=labels,
        patient_ids=[s["patient_id"] for s in samples],
        study_ids=[s["study_id"] for s in samples],
        image_ids=[s["image_id"] for s in samples],
        reports=[s["report"] for s in samples],
        meta={"split": split},
    )


def mask_on_model_grid(mask: np.ndarray, crop: tuple[int, int, int, int], cache_hw: tuple[int, int],
                       size: int) -> np.ndarray:
    """Move a mask on the original pixel grid through the image pipeline: crop to content, resize to
    the cached size, evaluation transform; bool [size, size]."""
    x0, y0, x1, y1 = crop
    cropped = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.float32))[None, None]
    cached = F.interpolate(cropped, size=cache_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    moved, _ = EvalTransform(size)(cached, torch.zeros(0, 4))
    return moved[0].numpy() >= 0.5


def attach_masks(eval_set: EvalSet, data_cfg, catalog: Path, target: str) -> EvalSet:
    """Fill eval_set.masks: the phantom's ground-truth masks for `target`, else the catalog's `mask_path`
    per image (a manifest column; a blank one is an empty mask)."""
    root = Path(data_cfg.root)
    catalog_db = open_catalog(catalog, readonly=True)
    try:
        with catalog_db.session() as session:
            rows = {row.id: ((row.crop_x0, row.crop_y0, row.crop_x1, row.crop_y1), (row.cache_height, row.cache_width),
                             (row.rows, row.cols), row.mask_path)
                    for row in session.scalars(select(Image).where(Image.id.in_(eval_set.image_ids)))}
    finally:
        catalog_db.close()
    if (root / "ground_truth.json").is_file():
        by_image: dict[str, Mask] = {r.image_id: r.mask for r in
                                     read_phantom(root, eval_set.meta["split"], target, check_files=False)}
    elif any(row[3] for row in rows.values()):
        by_image = {i: PngMask((root / row[3],) if row[3] else ()) for i, row in rows.items()}
    else:
        raise ValueError(f"segmentation needs masks; no image of split {eval_set.meta['split']!r} in {root} has "
                         "one (use the phantom, a manifest with a mask_path column, or a benchmark reader)")
    size = eval_set.images.shape[-1]
    masks = []
    for image_id in eval_set.image_ids:
        crop, cache_hw, shape, _ = rows[image_id]
        if image_id not in by_image:
            raise ValueError(f"image {image_id} has no mask entry in {root}; the masks and the catalog disagree")
        full = by_image[image_id].array(shape=shape)
        if full.shape != tuple(shape):
            raise ValueError(f"mask of image {image_id} is {full.shape}, the image is {tuple(shape)}")
        masks.append(mask_on_model_grid(full, crop, cache_hw, size))
    eval_set.masks = np.stack(masks)
    return eval_set


def use_truth_labels(eval_set: EvalSet, phantom_root: Path) -> EvalSet:
    """Replace the report-derived labels by the phantom's ground truth (every label known, 1 or 0)."""
    from evaluation.readers import labels_matrix
    from shared_models.vocab import CHEXPERT_LABELS

    records = {r.image_id: r for r in read_phantom(phantom_root, eval_set.meta["split"], check_files=False)}
    missing = [i for i in eval_set.image_ids if i not in records]
    if missing:
        raise ValueError(f"{len(missing)} catalog images (e.g. {missing[0]}) are not in {phantom_root}/ground_truth.json")
    eval_set.labels = labels_matrix([records[i] for i in eval_set.image_ids], CHEXPERT_LABELS)
    return eval_set
