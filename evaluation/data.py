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
    label_values: list[dict] = field(default_factory=list)   # per row: every label column by name (manifests)
    has_report: np.ndarray | None = None  # bool [N]: the study has a usable report (None: all have)
    has_mask: np.ndarray | None = None    # bool [N]: the image has a mask (None: all have, or no masks)

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, keep: np.ndarray) -> "EvalSet":
        """The subset of these rows (bool [N] or indices), every field alike."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        pick = lambda values: [values[i] for i in index]   # noqa: E731
        return EvalSet(
            images=self.images[torch.as_tensor(index)], labels=self.labels[index], patient_ids=pick(self.patient_ids),
            study_ids=pick(self.study_ids), image_ids=pick(self.image_ids), reports=pick(self.reports),
            masks=None if self.masks is None else self.masks[index],
            meta={k: v[index] if isinstance(v, np.ndarray) and len(v) == len(self) else v for k, v in self.meta.items()},
            label_values=pick(self.label_values) if self.label_values else [],
            has_report=None if self.has_report is None else self.has_report[index],
            has_mask=None if self.has_mask is None else self.has_mask[index])

    def with_masks(self) -> "EvalSet":
        """The rows that have a mask (segmentation trains and scores only on those)."""
        if self.masks is None:
            raise ValueError(f"split {self.meta.get('split')!r} has no masks attached")
        if self.has_mask is None:
            return self
        if not self.has_mask.any():
            raise ValueError(f"no image of split {self.meta.get('split')!r} has a mask (a blank mask_path means "
                             f"no mask; write {EMPTY_MASK} for an image with nothing to segment)")
        return self.rows(self.has_mask)

    def one_per_study(self) -> np.ndarray:
        """Row of the first image of each study with a report (retrieval pairs one image with its report)."""
        seen: dict[str, int] = {}
        for row, study in enumerate(self.study_ids):
            if self.has_report is None or self.has_report[row]:
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
    layout = open_layout(data_cfg.layout, root, data_cfg.get("reports"),
                         allow_outside_root=bool(data_cfg.get("allow_outside_root", False)), **options)
    views = list(data_cfg.views) if data_cfg.get("views") else None
    summary = index_data(layout, data_cfg.catalog, data_cfg.cache, views=views, max_pixels=data_cfg.max_pixels,
                         short_side=data_cfg.cache_short_side)
    if summary["indexed"]:
        log.info("indexed %d images (%s rejected)", summary["indexed"], summary["rejected"] or "none")
    return Path(data_cfg.catalog), Path(data_cfg.cache)


def load_split(catalog: Path, cache: Path, split: str | list[str], image_size: int, uncertain: str) -> EvalSet:
    """Every usable image of `split` (one name or several) through the evaluation transform, labels
    mapped by the uncertain policy. Images whose study has no usable report are kept: only
    retrieval reads the text, and it skips them (`has_report`)."""
    split = split if isinstance(split, str) else list(split)
    dataset = CxrDataset(catalog, cache, split=split, image_size=image_size, require_report=False)
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
        label_values=[s["label_values"] for s in samples],
        has_report=np.array([s["has_report"] for s in samples], dtype=bool),
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


EMPTY_MASK = "EMPTY"   # a manifest's mask_path for "segmented, nothing there"; a blank one means no mask


def manifest_mask(root: Path, mask_path: str | None, allow_outside_root: bool = False) -> PngMask | None:
    """A manifest row's mask: None for a blank mask_path (no mask: left out of segmentation), the empty
    mask for EMPTY, else the PNG file, which must lie inside the data folder."""
    mask_path = (mask_path or "").strip()
    if not mask_path:
        return None
    if mask_path.upper() == EMPTY_MASK:
        return PngMask(())
    from client.data.errors import Rejected
    from client.data.files import resolve_inside

    try:   # the data layer's one rule for listed paths (and the site's shared-storage opt-in)
        return PngMask((resolve_inside(Path(root), mask_path, allow_outside_root),))
    except Rejected as rejected:
        raise ValueError(f"mask_path {mask_path!r} is refused, outside the data folder {root}: "
                         f"{rejected.detail}") from None


def attach_masks(eval_set: EvalSet, data_cfg, catalog: Path, target: str) -> EvalSet:
    """Fill eval_set.masks and .has_mask: the phantom's ground-truth masks for `target`, else the catalog's
    `mask_path` per image (a manifest column: blank = no mask, EMPTY = an empty mask). An image without a
    mask, or whose mask cannot be read, is left out of segmentation (`EvalSet.with_masks`)."""
    root = Path(data_cfg.root)
    catalog_db = open_catalog(catalog, readonly=True)
    try:
        with catalog_db.session() as session:
            # in slices: one IN over a large split binds more ids than SQLite allows (32766 in its default builds)
            ids = eval_set.image_ids
            rows = {row.id: ((row.crop_x0, row.crop_y0, row.crop_x1, row.crop_y1), (row.cache_height, row.cache_width),
                             (row.rows, row.cols), row.mask_path)
                    for start in range(0, len(ids), 500)
                    for row in session.scalars(select(Image).where(Image.id.in_(ids[start:start + 500])))}
    finally:
        catalog_db.close()
    phantom = (root / "ground_truth.json").is_file()
    if phantom:
        by_image: dict[str, Mask] = {r.image_id: r.mask for r in
                                     read_phantom(root, eval_set.meta["split"], target, check_files=False)}
    else:
        by_image, refused = {}, []
        for image_id, row in rows.items():
            try:
                mask = manifest_mask(root, row[3], bool(data_cfg.get("allow_outside_root", False)))
            except ValueError as error:   # this image only: it is left out of segmentation
                refused.append(f"{image_id}: {error}")
                continue
            if mask is not None:
                by_image[image_id] = mask
        if refused:
            log.warning("%d mask_path value(s) refused, their images are left out of segmentation, e.g. %s",
                        len(refused), refused[0])
    if not by_image:
        raise ValueError(f"segmentation needs masks; no image of split {eval_set.meta['split']!r} in {root} has "
                         f"one (use the phantom, a manifest with a mask_path column — blank means no mask, "
                         f"{EMPTY_MASK} an empty one — or a benchmark reader)")
    size = eval_set.images.shape[-1]
    masks, has_mask, unreadable = [], [], []
    for image_id in eval_set.image_ids:
        crop, cache_hw, shape, _ = rows[image_id]
        if image_id not in by_image:
            if phantom:
                raise ValueError(f"image {image_id} has no mask entry in {root}; the masks and the catalog disagree")
            masks.append(np.zeros((size, size), dtype=bool))
            has_mask.append(False)
            continue
        try:
            full = by_image[image_id].array(shape=shape)
            if full.shape != tuple(shape):
                raise ValueError(f"mask is {full.shape}, the image is {tuple(shape)}")
        except (OSError, ValueError) as error:   # a missing, corrupt or mis-sized mask file: this image only
            unreadable.append(f"{image_id}: {error}")
            masks.append(np.zeros((size, size), dtype=bool))
            has_mask.append(False)
            continue
        masks.append(mask_on_model_grid(full, crop, cache_hw, size))
        has_mask.append(True)
    if unreadable:
        log.warning("%d mask(s) of split %s cannot be used and their images are left out of segmentation, e.g. %s",
                    len(unreadable), eval_set.meta["split"], unreadable[0])
    eval_set.masks, eval_set.has_mask = np.stack(masks), np.array(has_mask, dtype=bool)
    if not eval_set.has_mask.all():
        log.info("segmentation, split %s: %d of %d images have a mask; the others are left out",
                 eval_set.meta["split"], int(eval_set.has_mask.sum()), len(eval_set))
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
