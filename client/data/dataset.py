"""The torch Dataset over the catalog and the image cache: one sample per usable image."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from sqlalchemy import select
from torch.utils.data import Dataset

from client.data.cache import ImageCache
from client.data.catalog import Catalog, Image, Study, in_split, label_values, labels_as_floats, open_catalog
from client.data.transforms import EvalTransform, TrainTransform
from shared_models.batch import SECTIONS
from shared_models.vocab import OBSERVATIONS, REGIONS, ZONE_ATLAS

log = logging.getLogger(__name__)

ATLAS_BOXES = torch.tensor([ZONE_ATLAS[region] for region in REGIONS], dtype=torch.float32)


@dataclass(frozen=True)
class StudyText:
    findings: str
    impression: str
    report: str
    sentences: list[str]
    sentence_sections: list[str]    # each sentence's section: findings, impression, or text (no sections)
    sentence_regions: list[int]
    tags: torch.Tensor
    labels: torch.Tensor
    label_values: dict          # every label column by name (a manifest's own, e.g. covid), None = unknown
    has_report: bool


@dataclass(frozen=True)
class ImageEntry:
    image_id: str
    study_id: str
    patient_id: str
    cache: tuple[int, int, int, int]                 # shard, offset, height, width
    boxes: torch.Tensor                              # [len(REGIONS), 4] in the cached image


def report_text(findings: str, impression: str, sentences: list[str]) -> str:
    """Findings then impression; free-text reports (neither section) as their sentences."""
    return " ".join(part for part in (findings, impression) if part) or " ".join(sentences)


def sentence_labels(study: Study) -> tuple[list[str], list[str], list[int]]:
    """The study's sentences with each one's section and region, as the catalog holds them; ValueError (the reason)
    where they do not match: the findings words, the region-sentence pairs and the triplets are read through them,
    and a guess ("text", no region) would train those terms on the wrong words without a word said."""
    sentences = study.sentences if study.sentences is not None else []
    if not isinstance(sentences, list) or not all(isinstance(sentence, str) for sentence in sentences):
        raise ValueError("its sentences are not a list of texts")
    sections = study.sentence_section
    regions = study.sentence_regions if study.sentence_regions is not None else [-1] * len(sentences)
    if sections is None and not sentences:
        sections = []
    if not isinstance(sections, list) or len(sections) != len(sentences):
        held = "no" if sections is None else (f"{len(sections)}" if isinstance(sections, list) else "not a list")
        raise ValueError(f"its {len(sentences)} sentences have {held} section labels")
    unknown = sorted({str(name) for name in sections} - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sentence sections {unknown} (known: {', '.join(SECTIONS)})")
    if not isinstance(regions, list) or len(regions) != len(sentences):
        raise ValueError(f"its {len(sentences)} sentences have {len(regions) if isinstance(regions, list) else 'no'} "
                         "region labels")
    try:
        regions = [int(region) for region in regions]
    except (TypeError, ValueError):
        raise ValueError("its sentence regions are not whole numbers") from None
    if any(not -1 <= region < len(REGIONS) for region in regions):
        raise ValueError(f"a sentence region outside -1..{len(REGIONS) - 1}")
    return list(sentences), list(sections), regions


def boxes_for(image: Image) -> torch.Tensor:
    """Region boxes in the cached image: the layout's own where given (moved through the crop), else the atlas."""
    boxes = ATLAS_BOXES.clone()
    if image.boxes and image.cols and image.rows:
        x0, y0, x1, y1 = image.crop_x0, image.crop_y0, image.crop_x1, image.crop_y1
        for region, (bx1, by1, bx2, by2) in image.boxes.items():
            moved = [(bx1 * image.cols - x0) / (x1 - x0), (by1 * image.rows - y0) / (y1 - y0),
                     (bx2 * image.cols - x0) / (x1 - x0), (by2 * image.rows - y0) / (y1 - y0)]
            boxes[REGIONS.index(region)] = torch.tensor(moved).clamp(0.0, 1.0)
    return boxes


class CxrDataset(Dataset):
    """Images with status `ok` whose study has a usable report, read from the cache.

    `require_report=False` keeps the images of studies without one (empty text fields, `has_report`
    False): image-only evaluation (linear probe, segmentation) uses them, pre-training must not.

    `augmentation` holds TrainTransform's settings (`{}`: its defaults); None gives the deterministic
    evaluation view. `study_ids` / `patient_ids` restrict it (a site's partition);
    `site_transform(image, image_id)` runs on the cached image before augmentation (the simulation's
    per-site scanner).
    """

    def __init__(self, catalog: Catalog | str | os.PathLike, cache_dir: str | os.PathLike,
                 split: str | Iterable[str] | None = None, image_size: int = 224,
                 augmentation: Mapping | None = None,
                 study_ids: Iterable[str] | None = None, patient_ids: Iterable[str] | None = None,
                 site_transform: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                 require_report: bool = True):
        self.require_report = require_report
        self.refused_studies: dict[str, str] = {}   # study id -> why its report cannot be read (logged)
        self.cache = ImageCache(cache_dir)
        self.transform = (EvalTransform(image_size) if augmentation is None
                          else TrainTransform(image_size, **dict(augmentation)))
        self.site_transform = site_transform
        self.images, self.studies = self._load(catalog, split, study_ids, patient_ids)

    def _load(self, catalog, split, study_ids, patient_ids) -> tuple[list[ImageEntry], dict[str, StudyText]]:
        owned = not isinstance(catalog, Catalog)
        catalog = open_catalog(catalog, readonly=True) if owned else catalog
        query = (select(Image, Study).join(Study, Image.study_id == Study.id)
                 .where(Image.status == "ok", Image.cache_shard.is_not(None))
                 .order_by(Image.study_id, Image.id))
        if self.require_report:
            query = query.where(Study.report_status == "ok")
        if split is not None:
            query = query.where(in_split(split))
        # the restriction is applied here, not as an SQL IN: a site's partition of a large collection (MIMIC-CXR's
        # 227k studies in 3 sites) holds more ids than SQLite binds in one statement (32766 in its default builds)
        wanted_studies = None if study_ids is None else set(study_ids)
        wanted_patients = None if patient_ids is None else set(patient_ids)
        images, studies = [], {}
        try:
            with catalog.session() as session:
                for image, study in session.execute(query):
                    if ((wanted_studies is not None and study.id not in wanted_studies)
                            or (wanted_patients is not None and study.patient_id not in wanted_patients)
                            or study.id in self.refused_studies):
                        continue
                    if study.id not in studies:
                        try:
                            studies[study.id] = self._study_text(study)
                        except ValueError as error:
                            if self.require_report:
                                self.refused_studies[study.id] = str(error)
                                continue
                            studies[study.id] = self._study_text(study, report=False)
                    images.append(ImageEntry(image.id, study.id, study.patient_id,
                                             (image.cache_shard, image.cache_offset, image.cache_height,
                                              image.cache_width), boxes_for(image)))
        finally:
            if owned:
                catalog.close()
        if self.refused_studies:
            log.warning("%d studies left out: their catalog rows' sentence labels do not match their sentences "
                        "(first: %s); index the site again into a new catalog (python -m client.data index ... "
                        "--catalog NEW) to parse their reports afresh", len(self.refused_studies),
                        "; ".join(f"{sid}: {why}" for sid, why in list(self.refused_studies.items())[:3]))
        return images, studies

    @staticmethod
    def _study_text(study: Study, report: bool = True) -> StudyText:
        """`report=False`: the study's images without its text (image-only evaluation of a study whose
        sentence labels are unreadable)."""
        labels = torch.tensor(labels_as_floats(study.labels), dtype=torch.float32)
        if not report:
            return StudyText("", "", "", [], [], [], torch.zeros(len(OBSERVATIONS)), labels,
                             label_values(study.labels), False)
        findings, impression = study.findings or "", study.impression or ""
        sentences, sections, regions = sentence_labels(study)
        tags = study.tags if study.tags is not None else [0.0] * len(OBSERVATIONS)
        return StudyText(findings, impression, report_text(findings, impression, sentences), sentences,
                         sections, regions, torch.tensor(tags, dtype=torch.float32), labels,
                         label_values(study.labels), study.report_status == "ok")

    @property
    def patient_ids(self) -> list[str]:
        return [entry.patient_id for entry in self.images]

    @property
    def study_ids(self) -> list[str]:
        return [entry.study_id for entry in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        entry = self.images[index]
        pixels = np.array(self.cache.read(*entry.cache))          # copy out of the read-only map
        image = torch.from_numpy(pixels).to(torch.float32).div_(255.0)[None]
        if self.site_transform is not None:
            image = self.site_transform(image, entry.image_id)
        image, boxes = self.transform(image, entry.boxes)
        study = self.studies[entry.study_id]
        return {
            "image": image.clamp_(0.0, 1.0), "patient_id": entry.patient_id, "study_id": entry.study_id,
            "image_id": entry.image_id, "findings": study.findings, "impression": study.impression,
            "report": study.report, "sentences": list(study.sentences),
            "sentence_sections": list(study.sentence_sections),
            "sentence_regions": list(study.sentence_regions), "tags": study.tags.clone(),
            "labels": study.labels.clone(), "boxes": boxes,
            "label_values": dict(study.label_values), "has_report": study.has_report,
        }
