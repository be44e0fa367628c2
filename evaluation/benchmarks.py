"""The public benchmarks in their own files (RSNA Pneumonia, SIIM-ACR, CheXpert, COVIDx) as evaluation splits.

No catalog and no conversion: the readers give the records, each image is decoded from its file (DICOM,
PNG or JPEG) straight to the model's size, and boxes / RLE masks are drawn on the image's own grid first.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from client.data.errors import Rejected
from client.data.images import read_image
from client.data.transforms import EvalTransform
from evaluation.data import EvalSet, mask_on_model_grid
from evaluation.readers import Record, class_targets, labels_matrix, read_chexpert, read_covidx, read_rsna, read_siim
from evaluation.sampling import split_by_patient
from shared_models.vocab import CHEXPERT_LABELS

log = logging.getLogger(__name__)


def _single_table(records: list[Record], data_cfg) -> tuple[list[Record], list[Record]]:
    """RSNA and SIIM ship one labelled table: split it by patient (`test_fraction`, `split_seed`)."""
    test_fraction = float(data_cfg.test_fraction)
    rows = split_by_patient([r.patient_id for r in records], {"train": 1.0 - test_fraction, "test": test_fraction},
                            int(data_cfg.split_seed))
    return [records[i] for i in rows["train"]], [records[i] for i in rows["test"]]


def _rsna(data_cfg, uncertain: str) -> tuple[list[Record], list[Record]]:
    root = Path(data_cfg.root)
    return _single_table(read_rsna(root / data_cfg.labels, root / data_cfg.images), data_cfg)


def _siim(data_cfg, uncertain: str) -> tuple[list[Record], list[Record]]:
    root = Path(data_cfg.root)
    return _single_table(read_siim(root / data_cfg.labels, root / data_cfg.images, style=data_cfg.rle_style), data_cfg)


def _chexpert(data_cfg, uncertain: str) -> tuple[list[Record], list[Record]]:
    root = Path(data_cfg.root)
    read = {"root": root, "uncertain": uncertain, "frontal_only": bool(data_cfg.frontal_only)}
    return read_chexpert(root / data_cfg.train_labels, **read), read_chexpert(root / data_cfg.test_labels, **read)


def _covidx(data_cfg, uncertain: str) -> tuple[list[Record], list[Record]]:
    root = Path(data_cfg.root)
    return (read_covidx(root / data_cfg.train_split, root / data_cfg.train_images),
            read_covidx(root / data_cfg.test_split, root / data_cfg.test_images))


BENCHMARKS: dict[str, Callable[..., tuple[list[Record], list[Record]]]] = {
    "rsna": _rsna, "siim": _siim, "chexpert": _chexpert, "covidx": _covidx,
}


def to_eval_set(records: list[Record], image_size: int, split: str, masks: bool, max_pixels: int,
                classes: list[str] | None = None) -> EvalSet:
    """Decode every record's image to [1, S, S]; an unreadable file is left out with its reason logged (and
    counted in meta["rejected"]). Multi-class records (COVIDx) get `meta["classes"]` and `meta["class_ids"]`."""
    transform = EvalTransform(image_size)
    images, kept, grids, rejected = [], [], [], {}
    for record in records:
        try:
            pixels = torch.from_numpy(read_image(record.image_path, max_pixels).pixels)[None]
        except Rejected as err:
            rejected[record.image_id] = str(err)
            continue
        image, _ = transform(pixels, torch.zeros(0, 4))
        images.append(image)
        kept.append(record)
        height, width = pixels.shape[-2:]
        if masks:
            if record.mask is None:
                raise ValueError(f"{split}: image {record.image_id} has no mask; this benchmark cannot be segmented")
            grids.append(mask_on_model_grid(record.mask.array(shape=(height, width)), (0, 0, width, height),
                                            (height, width), image_size))
    if rejected:
        log.warning("%s: %d of %d images left out, e.g. %s", split, len(rejected), len(records),
                    next(iter(rejected.values())))
    if not kept:
        raise ValueError(f"{split}: none of {len(records)} images could be read; check data.root and the image folders")
    meta: dict = {"split": split, "rejected": rejected}
    if kept[0].label is not None:
        meta["class_ids"], meta["classes"] = class_targets(kept, classes)
    return EvalSet(
        images=torch.stack(images), labels=labels_matrix(kept, CHEXPERT_LABELS),
        patient_ids=[r.patient_id for r in kept], study_ids=[r.study_id or r.image_id for r in kept],
        image_ids=[r.image_id for r in kept], reports=["" for _ in kept],
        masks=np.stack(grids) if masks else None, meta=meta)


def load_benchmark(data_cfg, image_size: int, uncertain: str, masks: bool) -> tuple[EvalSet, EvalSet]:
    """(train, test) of `data_cfg.benchmark` under `data_cfg.root`, patient-disjoint."""
    name = str(data_cfg.benchmark)
    if name not in BENCHMARKS:
        raise ValueError(f"data.benchmark={name!r} is not one of {sorted(BENCHMARKS)}")
    if not Path(data_cfg.root).is_dir():
        raise FileNotFoundError(f"data.root {data_cfg.root} does not exist; point it at the {name} download")
    train_records, test_records = BENCHMARKS[name](data_cfg, uncertain)
    train = to_eval_set(train_records, image_size, f"{name} train", masks, int(data_cfg.max_pixels))
    test = to_eval_set(test_records, image_size, f"{name} test", masks, int(data_cfg.max_pixels),
                       classes=train.meta.get("classes"))
    return train, test
