"""Readers for evaluation datasets in their own file formats, each returning a list of `Record`.

Benchmarks: RSNA Pneumonia, SIIM-ACR Pneumothorax, CheXpert, COVIDx; plus the phantom's ground truth
(its masks). MIMIC-CXR and CSV manifests are read as a site reads them, through `client.data.layouts` and
the catalog (`evaluation.data`), so both sides agree on paths and ids.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared_models.vocab import CHEXPERT_LABELS, OBSERVATIONS

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
MASK_TARGET_ANY = "any"


# ---------------------------------------------------------------------------------------- masks
class Mask:
    """A binary mask decoded only when asked for (a benchmark's masks would not fit in memory)."""

    def array(self, shape: tuple[int, int] | None = None) -> np.ndarray:  # bool [H, W]
        raise NotImplementedError


@dataclass(frozen=True)
class BoxMask(Mask):
    """Union of axis-aligned boxes (x, y, width, height) in pixels on an image of `shape` (rows, cols)."""

    boxes: tuple[tuple[float, float, float, float], ...]
    shape: tuple[int, int]

    def array(self, shape=None):
        return boxes_to_mask(self.boxes, self.shape)


@dataclass(frozen=True)
class RleMask(Mask):
    """Union of SIIM run-length encodings on an image of `shape` (rows, cols)."""

    rles: tuple[str, ...]
    shape: tuple[int, int]
    style: str = "relative"

    def array(self, shape=None):
        mask = np.zeros(self.shape, dtype=bool)
        for rle in self.rles:
            mask |= decode_siim_rle(rle, self.shape, self.style)
        return mask


MAX_MASK_BYTES = 256 * 2**20


def _regular_file(path: Path):
    """An open handle on a mask file through the data layer's bounded reader: a pipe or device listed as a mask
    is refused (ValueError, that image only) instead of blocking the evaluation."""
    from client.data.errors import Rejected
    from client.data.files import open_regular

    try:
        return open_regular(Path(path), MAX_MASK_BYTES)
    except Rejected as rejected:
        raise ValueError(f"mask {path}: {rejected.detail}") from None


@dataclass(frozen=True)
class PngMask(Mask):
    """Union of 0/255 PNG masks; with no files, an empty mask of the shape the caller gives (the image's)."""

    paths: tuple[Path, ...]

    def array(self, shape=None):
        from PIL import Image

        if not self.paths:
            if shape is None:
                raise ValueError("an empty PngMask needs the image shape to build its all-zero mask")
            return np.zeros(shape, dtype=bool)
        mask = None
        for path in self.paths:
            with _regular_file(path) as handle:
                layer = np.asarray(Image.open(handle).convert("L")) > 127
            if mask is not None and layer.shape != mask.shape:
                raise ValueError(f"mask {path} is {layer.shape}, other masks of the image are {mask.shape}")
            mask = layer if mask is None else mask | layer
        return mask


def boxes_to_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Boxes (x, y, width, height) in pixels -> bool mask; edges rounded to the nearest pixel, clipped to the image."""
    rows, cols = shape
    mask = np.zeros((rows, cols), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        x1, y1 = min(cols, int(round(x + w))), min(rows, int(round(y + h)))
        mask[y0:y1, x0:x1] = True
    return mask


def decode_siim_rle(rle: str, shape: tuple[int, int], style: str = "relative") -> np.ndarray:
    """SIIM-ACR run-length code -> bool mask [rows, cols]. `-1` is an empty mask.

    Pixels are numbered column by column (down the first column, then the next). In the
    `relative` code (train-rle.csv) each start is the 0-based gap after the previous run's end;
    in the `absolute` code (the stage-2 files) each start is the 1-based pixel number."""
    rows, cols = shape
    flat = np.zeros(rows * cols, dtype=bool)
    text = rle.strip()
    if text and text != "-1":
        try:
            numbers = np.array(text.split(), dtype=np.int64)
        except ValueError:
            raise ValueError(f"SIIM RLE holds a non-integer: {text[:60]!r}") from None
        if len(numbers) % 2:
            raise ValueError(f"SIIM RLE has an odd count of numbers ({len(numbers)}): {text[:60]!r}")
        starts, lengths = numbers[0::2], numbers[1::2]
        if style == "relative":
            begins = np.cumsum(starts + lengths) - lengths
        elif style == "absolute":
            begins = starts - 1
        else:
            raise ValueError(f"unknown SIIM RLE style {style!r}; use 'relative' or 'absolute'")
        if np.any(begins < 0) or np.any(lengths < 0) or np.any(begins + lengths > flat.size):
            raise ValueError(f"SIIM RLE runs fall outside a {rows}x{cols} image: {text[:60]!r}")
        for begin, length in zip(begins, lengths):
            flat[begin:begin + length] = True
    return flat.reshape(cols, rows).T


def encode_siim_rle(mask: np.ndarray, style: str = "relative") -> str:
    """bool mask [rows, cols] -> SIIM run-length code (the inverse of `decode_siim_rle`)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    if not flat.any():
        return "-1"
    edges = np.flatnonzero(np.diff(np.r_[0, flat.astype(np.int8), 0]))
    begins, ends = edges[0::2], edges[1::2]
    starts = begins - np.r_[0, ends[:-1]] if style == "relative" else begins + 1
    return " ".join(f"{s} {n}" for s, n in zip(starts, ends - begins))


# -------------------------------------------------------------------------------------- records
@dataclass
class Record:
    """One evaluation image: where it is, whose it is, and what is known about it."""

    image_path: Path
    patient_id: str
    image_id: str
    study_id: str | None = None
    labels: dict[str, float] = field(default_factory=dict)   # multi-label; NaN = missing
    label: str | None = None                                 # multi-class (COVIDx)
    mask: Mask | None = None
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


def labels_matrix(records: Sequence[Record], names: Sequence[str]) -> np.ndarray:
    """float32 [N, K]: each record's label per name, NaN where the record does not have it."""
    return np.array([[r.labels.get(n, math.nan) for n in names] for r in records], dtype=np.float32).reshape(
        len(records), len(names))


def class_targets(records: Sequence[Record], classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer class per record and the class list (sorted unless given)."""
    classes = list(classes) if classes is not None else sorted({r.label for r in records})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise ValueError(f"records carry classes {unknown} outside the class list {classes}")
    return np.array([index[r.label] for r in records], dtype=np.int64), classes


def uncertain_value(value: float, policy: str) -> float:
    """Map a CheXpert-style label (1, 0, -1 uncertain, NaN blank) under the named uncertain policy."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"unknown uncertain-label policy {policy!r}; use one of {UNCERTAIN_POLICIES}")
    if value == -1:
        return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]
    return value


# ------------------------------------------------------------------------------------ csv helpers
def _open_text(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the dataset root")
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows as dicts with whitespace stripped from names and values (SIIM's header is 'ImageId, EncodedPixels')."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {header}")
        return [dict(zip(header, (v.strip() for v in row))) for row in reader if any(v.strip() for v in row)]


def _label_value(text: str, path: Path, column: str) -> float:
    if text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: column {column!r} holds {text!r}; expected 1, 0, -1 or blank") from None
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{path}: column {column!r} holds {text!r}; expected 1, 0, -1 or blank")
    return value


def _check_files(records: list[Record], check: bool, what: str) -> list[Record]:
    if check:
        missing = [r.image_path for r in records if not Path(r.image_path).is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} of {len(records)} images are missing, "
                                    f"e.g. {missing[0]}; point the image folder at the downloaded images")
    return records


# ------------------------------------------------------------------------------------- benchmarks
def read_rsna(labels_csv: Path, image_dir: Path, image_shape=(1024, 1024), check_files: bool = True) -> list[Record]:
    """RSNA Pneumonia `stage_2_train_labels.csv` (patientId, x, y, width, height, Target): one record per
    image (several rows = several boxes), label `Pneumonia`, the boxes as the mask."""
    labels_csv = Path(labels_csv)
    rows = _read_csv(labels_csv, ["patientId", "x", "y", "width", "height", "Target"])
    targets: dict[str, set[str]] = defaultdict(set)
    boxes: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        image = row["patientId"]
        targets[image].add(row["Target"])
        if row["Target"] == "1":
            try:
                boxes[image].append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))
            except ValueError:
                raise ValueError(f"{labels_csv}:{line}: Target 1 needs numeric x, y, width, height") from None
        elif row["Target"] != "0" or any(row[k] for k in ("x", "y", "width", "height")):
            raise ValueError(f"{labels_csv}:{line}: Target must be 0 (no box) or 1 (with a box); got {row}")
    records = []
    for image, target in targets.items():
        if len(target) > 1:
            raise ValueError(f"{labels_csv}: image {image} has rows with Target 0 and rows with Target 1")
        records.append(Record(
            image_path=Path(image_dir) / f"{image}.dcm", patient_id=image, image_id=image,
            labels={"Pneumonia": float(target.pop())},
            mask=BoxMask(tuple(boxes[image]), tuple(image_shape))))
    return _check_files(records, check_files, str(labels_csv))


def read_siim(rle_csv: Path, image_dir: Path, image_shape=(1024, 1024), style: str = "relative",
              check_files: bool = True) -> list[Record]:
    """SIIM-ACR Pneumothorax `train-rle.csv` (ImageId, EncodedPixels): several rows of one image are
    unioned, `-1` is empty; label `Pneumothorax`. Images are found anywhere under image_dir by name
    (`<ImageId>.dcm`, the release nests them in study/series folders). The CSV has no patient
    column; SIIM images are one per anonymised patient, so the image id stands for the patient."""
    rle_csv = Path(rle_csv)
    rows = _read_csv(rle_csv, ["ImageId", "EncodedPixels"])
    rles: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        codes = rles[row["ImageId"]]   # an image with only `-1` rows still gets its (empty) entry
        if row["EncodedPixels"] not in ("-1", ""):
            codes.append(row["EncodedPixels"])
    by_name = {p.stem: p for p in Path(image_dir).rglob("*.dcm")} if Path(image_dir).is_dir() else {}
    records = [Record(
        image_path=by_name.get(image, Path(image_dir) / f"{image}.dcm"), patient_id=image, image_id=image,
        labels={"Pneumothorax": 1.0 if codes else 0.0},
        mask=RleMask(tuple(codes), tuple(image_shape), style)) for image, codes in rles.items()]
    return _check_files(records, check_files, str(rle_csv))


CHEXPERT_META = ("Sex", "Age", "Frontal/Lateral", "AP/PA")
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(patient\d+/study\d+)")


def read_chexpert(labels_csv: Path, root: Path | None = None, uncertain: str = "ones",
                  frontal_only: bool = False, check_files: bool = True) -> list[Record]:
    """CheXpert `train.csv` / `valid.csv`: 14 observations (1, 0, -1 uncertain, blank = NaN) with -1
    mapped by the `uncertain` policy. `Path` is relative to the folder holding the dataset folder
    (default: the CSV's grandparent). Patient and study ids come from the path."""
    labels_csv = Path(labels_csv)
    root = Path(root) if root is not None else labels_csv.parent.parent
    uncertain_value(0.0, uncertain)   # validates the policy name up front
    rows = _read_csv(labels_csv, ["Path", *CHEXPERT_META, *CHEXPERT_LABELS])
    records = []
    for line, row in enumerate(rows, start=2):
        patient, study = _PATIENT.search(row["Path"]), _STUDY.search(row["Path"])
        if patient is None or study is None:
            raise ValueError(f"{labels_csv}:{line}: Path {row['Path']!r} has no patientNNNNN/studyN part")
        if frontal_only and row["Frontal/Lateral"] != "Frontal":
            continue
        records.append(Record(
            image_path=root / row["Path"], patient_id=patient.group(1), image_id=row["Path"],
            study_id=study.group(1),
            labels={n: uncertain_value(_label_value(row[n], labels_csv, n), uncertain) for n in CHEXPERT_LABELS},
            meta={k: row[k] for k in CHEXPERT_META}))
    return _check_files(records, check_files, str(labels_csv))


def read_covidx(split_txt: Path, image_dir: Path, check_files: bool = True) -> list[Record]:
    """COVIDx split file, one `patient_id filename class source` per line (space-separated; older
    releases omit the source). Patient ids repeat across sources, so the id is `source/patient_id`."""
    split_txt = Path(split_txt)
    records = []
    with _open_text(split_txt) as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 3:
                patient, filename, label, source = *parts, ""
            elif len(parts) == 4:
                patient, filename, label, source = parts
            else:
                raise ValueError(f"{split_txt}:{line_no}: expected 'patient_id filename class source', "
                                 f"got {len(parts)} fields: {line.strip()[:80]!r}")
            records.append(Record(
                image_path=Path(image_dir) / filename, patient_id=f"{source}/{patient}" if source else patient,
                image_id=filename, label=label, meta={"source": source}))
    return _check_files(records, check_files, str(split_txt))


# ------------------------------------------------------------------------- MIMIC layout and phantom
def _mimic_image_path(root: Path, subject: str, study: str, dicom: str, ext: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}{ext}"


def read_phantom(root: Path, split: str | Sequence[str] = "test", mask_target: str = MASK_TARGET_ANY,
                 check_files: bool = True) -> list[Record]:
    """The phantom's `ground_truth.json` for one split or several: study labels, and per image the union
    of the masks of the findings named `mask_target` (an observation, or `any`); empty when none."""
    root = Path(root)
    splits = {split} if isinstance(split, str) else set(split)
    if mask_target != MASK_TARGET_ANY and mask_target not in OBSERVATIONS:
        raise ValueError(f"mask target {mask_target!r} is neither 'any' nor an observation in shared_models.vocab")
    truth_path = root / "ground_truth.json"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path} does not exist; generate the phantom (python -m simulations.phantom)")
    truth = json.loads(truth_path.read_text())
    records = []
    for study_id, study in truth["studies"].items():
        if study["split"] not in splits:
            continue
        subject, study_number = str(study["subject_id"]).lstrip("p"), str(study_id).lstrip("s")
        for dicom in study["dicom_ids"]:
            masks = tuple(root / f["masks"][dicom] for f in study["findings"]
                          if dicom in f.get("masks", {}) and mask_target in (MASK_TARGET_ANY, f["finding"]))
            records.append(Record(
                image_path=_mimic_image_path(root, subject, study_number, dicom, ".dcm"),
                patient_id=subject, image_id=dicom, study_id=study_number,
                labels={k: float(v) for k, v in study["labels"].items()}, mask=PngMask(masks), split=study["split"],
                meta={"findings": ",".join(sorted({f["finding"] for f in study["findings"]}))}))
    return _check_files(records, check_files, str(truth_path))
