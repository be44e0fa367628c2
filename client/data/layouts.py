"""Site data layouts (MIMIC-CXR, MIMIC-CXR-JPG, CSV manifest) read into one list of studies and images."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from client.data.errors import Rejected
from shared_models.vocab import CHEXPERT_LABELS, REGIONS

DEFAULT_VIEWS = ("PA", "AP")
MAX_REPORT_BYTES = 256 * 1024


class LayoutError(ValueError):
    """The data folder, a required file or a CSV's columns are not what the layout expects."""


@dataclass(slots=True)
class ImageRecord:
    image_id: str
    path: str                          # POSIX path relative to the layout root
    view: str | None = None            # upper-case view position from the metadata, if it has one
    site: str | None = None
    mask_path: str | None = None
    boxes: dict[str, list[float]] | None = None   # region -> (x1, y1, x2, y2), fractions of the stored image


@dataclass(slots=True)
class StudyRecord:
    patient_id: str
    study_id: str
    images: list[ImageRecord] = field(default_factory=list)
    split: str | None = None
    labels: list[float | None] | None = None   # CHEXPERT_LABELS order; None where blank
    report_key: str | None = None              # where the layout's report store finds the report
    report_text: str | None = None             # the report itself, when the layout carries it inline


def view_allowed(view: str | None, views: Iterable[str] | None) -> bool:
    """Whether an image with this view position passes the view filter (`None` = no filter)."""
    if views is None:
        return True
    return view is not None and view.strip().upper() in {v.strip().upper() for v in views}


def decode_report(data: bytes, name: str, max_bytes: int = MAX_REPORT_BYTES) -> str:
    """Report bytes as text, or Rejected with the reason (too large, binary, not UTF-8)."""
    if len(data) > max_bytes:
        raise Rejected("report_too_large", f"{name}: {len(data)} bytes, limit {max_bytes}")
    if b"\x00" in data:
        raise Rejected("unreadable_text", f"{name}: contains NUL bytes; is it a text file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise Rejected("unreadable_text", f"{name}: not UTF-8 at byte {error.start}; re-encode it as UTF-8") from None


# --- CSV tables -------------------------------------------------------------------------------

def find_table(root: Path, stem: str) -> Path | None:
    """`stem.csv` or `stem.csv.gz` under root, whichever exists."""
    for suffix in (".csv", ".csv.gz"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    return None


def read_table(path: Path, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """Rows of a plain or gzipped CSV, checking that the required columns are there."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise LayoutError(f"{path}: missing column(s) {', '.join(missing)}; "
                                  f"found {', '.join(reader.fieldnames or []) or 'no header'}")
            return list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise LayoutError(f"{path}: cannot read this CSV ({error})") from None


def parse_label(value: str | None) -> float | None:
    value = (value or "").strip()
    return float(value) if value else None


def labels_from_row(row: dict[str, str]) -> list[float | None]:
    return [parse_label(row.get(name)) for name in CHEXPERT_LABELS]


# --- report stores ------------------------------------------------------------------------------

class FolderReports:
    """Reports as files: `<base>/files/pNN/pNNNNNNNN/sNNNNNNNN.txt` (or the same path without `files/`)."""

    def __init__(self, base: Path):
        self.base = base

    def read(self, key: str) -> bytes | None:
        for candidate in (self.base / key, self.base / PurePosixPath(key).relative_to("files")):
            try:
                return candidate.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as error:
                raise Rejected("unreadable_text", f"{candidate}: {error.strerror or error}") from None
        return None


class ZipReports:
    """Reports read straight from `mimic-cxr-reports.zip`, whatever folder prefix its entries carry."""

    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as error:
            raise LayoutError(f"{path}: not a readable zip of reports ({error})") from None
        self.path = path
        # Keyed by the path from `files/` on (or the whole name when there is no `files/`).
        self.names = {}
        for name in self.zip.namelist():
            if name.endswith(".txt"):
                parts = PurePosixPath(name).parts
                tail = parts[parts.index("files"):] if "files" in parts else ("files",) + parts[-3:]
                self.names[str(PurePosixPath(*tail))] = name

    def read(self, key: str) -> bytes | None:
        name = self.names.get(key)
        if name is None:
            return None
        try:
            return self.zip.read(name)
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            raise Rejected("unreadable_text", f"{self.path}!{name}: {error}") from None


def open_reports(path: Path) -> FolderReports | ZipReports:
    if not path.exists():
        raise LayoutError(f"{path}: reports path does not exist; give a folder holding "
                          "files/pNN/pNNNNNNNN/sNNNNNNNN.txt or mimic-cxr-reports.zip")
    return ZipReports(path) if path.is_file() else FolderReports(path)


# --- layouts ------------------------------------------------------------------------------------

class Layout:
    """A site's data: `studies()` lists what there is, `read_report(study)` returns a report's text."""

    name = ""

    def __init__(self, root: str | os.PathLike, reports: str | os.PathLike | None = None,
                 max_report_bytes: int = MAX_REPORT_BYTES):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise LayoutError(f"{self.root}: data root does not exist or is not a folder; "
                              f"expected the {self.name} layout here")
        self.max_report_bytes = max_report_bytes
        self.report_stores = self._report_stores(Path(reports).expanduser() if reports else None)

    def _report_stores(self, reports: Path | None) -> list:
        return [open_reports(reports)] if reports else []

    def studies(self) -> list[StudyRecord]:
        raise NotImplementedError

    def read_report(self, study: StudyRecord) -> str:
        if study.report_text is not None:
            return study.report_text
        if study.report_key is not None:
            for store in self.report_stores:
                data = store.read(study.report_key)
                if data is not None:
                    return decode_report(data, study.report_key, self.max_report_bytes)
        raise Rejected("no_report", f"no report {study.report_key or ''} for study {study.study_id}".strip())


class MimicCxr(Layout):
    """PhysioNet MIMIC-CXR (DICOM release): files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm + CSVs."""

    name = "mimic_cxr"
    extension = ".dcm"

    def __init__(self, root, reports=None, max_report_bytes=MAX_REPORT_BYTES):
        super().__init__(root, reports, max_report_bytes)
        if not (self.root / "files").is_dir():
            raise LayoutError(f"{self.root}: no files/ folder; the {self.name} layout expects "
                              f"files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>{self.extension}")

    def _report_stores(self, reports):
        if reports:
            return [open_reports(reports)]
        stores = [FolderReports(self.root)]
        if (self.root / "mimic-cxr-reports.zip").is_file():
            stores.append(ZipReports(self.root / "mimic-cxr-reports.zip"))
        return stores

    def studies(self) -> list[StudyRecord]:
        metadata = self._table("mimic-cxr-2.0.0-metadata", ("dicom_id", "ViewPosition"))
        views = {row["dicom_id"]: (row["ViewPosition"].strip().upper() or None) for row in metadata or []}
        split_rows = self._table("mimic-cxr-2.0.0-split", ("dicom_id", "split"))
        splits = {row["dicom_id"]: row["split"].strip() or None for row in split_rows or []}
        label_rows = (self._table("mimic-cxr-2.0.0-chexpert", ("subject_id", "study_id"))
                      or self._table("mimic-cxr-2.0.0-negbio", ("subject_id", "study_id")) or [])
        labels = {(row["subject_id"], row["study_id"]): labels_from_row(row) for row in label_rows}

        studies: dict[tuple[str, str], StudyRecord] = {}
        for patient_id, study_id, image_id, path in self._image_list(metadata):
            study = studies.get((patient_id, study_id))
            if study is None:
                study = studies[(patient_id, study_id)] = StudyRecord(
                    patient_id, study_id, labels=labels.get((patient_id, study_id)),
                    report_key=f"files/p{patient_id[:2]}/p{patient_id}/s{study_id}.txt")
            study.images.append(ImageRecord(image_id, path, view=views.get(image_id)))
            study.split = study.split or splits.get(image_id)
        return list(studies.values())

    def _table(self, stem: str, required) -> list[dict[str, str]] | None:
        path = find_table(self.root, stem)
        return read_table(path, required) if path else None

    def _image_list(self, metadata) -> Iterable[tuple[str, str, str, str]]:
        """(patient_id, study_id, image_id, path) from the record list, else the metadata, else files/."""
        records = self._table("cxr-record-list", ("subject_id", "study_id", "dicom_id", "path"))
        if records is not None:
            for row in records:
                path = str(PurePosixPath(row["path"]).with_suffix(self.extension))
                yield row["subject_id"], row["study_id"], row["dicom_id"], path
        elif metadata is not None and {"subject_id", "study_id"} <= set(metadata[0] if metadata else {}):
            for row in metadata:
                patient, study = row["subject_id"], row["study_id"]
                yield patient, study, row["dicom_id"], \
                    f"files/p{patient[:2]}/p{patient}/s{study}/{row['dicom_id']}{self.extension}"
        else:
            yield from self._walk()

    def _walk(self) -> Iterable[tuple[str, str, str, str]]:
        files = self.root / "files"
        for group in sorted(os.scandir(files), key=lambda e: e.name):
            if not (group.is_dir() and group.name.startswith("p")):
                continue
            for patient in sorted(os.scandir(group.path), key=lambda e: e.name):
                if not (patient.is_dir() and patient.name.startswith("p")):
                    continue
                for study in sorted(os.scandir(patient.path), key=lambda e: e.name):
                    if not (study.is_dir() and study.name.startswith("s")):
                        continue
                    for image in sorted(os.scandir(study.path), key=lambda e: e.name):
                        if image.name.endswith(self.extension):
                            yield (patient.name[1:], study.name[1:], image.name[:-len(self.extension)],
                                   f"files/{group.name}/{patient.name}/{study.name}/{image.name}")


class MimicCxrJpg(MimicCxr):
    """PhysioNet MIMIC-CXR-JPG: the same tree with .jpg images; reports come from elsewhere."""

    name = "mimic_cxr_jpg"
    extension = ".jpg"

    def _report_stores(self, reports):
        if reports is None and not (self.root / "mimic-cxr-reports.zip").is_file():
            raise LayoutError(f"{self.root}: MIMIC-CXR-JPG ships no reports; pass the DICOM release's "
                              "reports folder or mimic-cxr-reports.zip as reports (--reports PATH)")
        return super()._report_stores(reports)


class Manifest(Layout):
    """A CSV with one row per image: image_path, report (or findings + impression) and optional columns."""

    name = "manifest"

    def __init__(self, root, reports=None, max_report_bytes=MAX_REPORT_BYTES, manifest="manifest.csv"):
        super().__init__(root, None, max_report_bytes)
        self.manifest = self.root / manifest
        if not self.manifest.is_file():
            raise LayoutError(f"{self.manifest}: manifest not found; expected a CSV with columns image_path "
                              "and report (or findings and impression)")

    def studies(self) -> list[StudyRecord]:
        rows = read_table(self.manifest, ("image_path",))
        columns = set(rows[0]) if rows else set()
        if rows and "report" not in columns and not {"findings", "impression"} & columns:
            raise LayoutError(f"{self.manifest}: needs a report column, or findings and/or impression columns")
        studies: dict[str, StudyRecord] = {}
        for number, row in enumerate(rows, start=2):
            image_path = row["image_path"].strip()
            if not image_path:
                raise LayoutError(f"{self.manifest}, line {number}: empty image_path")
            path = self._relative(image_path)
            study_id = (row.get("study_id") or "").strip() or derived_id("s", path)
            patient_id = (row.get("patient_id") or "").strip() or derived_id("p", study_id)
            study = studies.get(study_id)
            if study is None:
                study = studies[study_id] = StudyRecord(
                    patient_id, study_id, split=(row.get("split") or "").strip() or None,
                    labels=labels_from_row(row) if set(CHEXPERT_LABELS) & columns else None,
                    report_text=report_from_row(row))
            study.images.append(ImageRecord(
                image_id=(row.get("image_id") or "").strip() or str(PurePosixPath(path).with_suffix("")),
                path=path,
                view=(row.get("view") or "").strip().upper() or None,
                site=(row.get("site") or "").strip() or None,
                mask_path=(row.get("mask_path") or "").strip() or None,
                boxes=parse_boxes(row.get("boxes"), self.manifest, number)))
        return list(studies.values())

    def _relative(self, image_path: str) -> str:
        path = Path(image_path)
        if path.is_absolute():
            try:
                return path.resolve().relative_to(self.root).as_posix()
            except ValueError:
                return path.as_posix()  # outside the root: kept absolute
        return PurePosixPath(image_path.replace("\\", "/")).as_posix()


def derived_id(prefix: str, key: str) -> str:
    """A stable id for a manifest row that has none (the same input always gives the same id)."""
    return f"{prefix}{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def report_from_row(row: dict[str, str]) -> str:
    if (row.get("report") or "").strip():
        return row["report"]
    findings, impression = (row.get("findings") or "").strip(), (row.get("impression") or "").strip()
    return "\n".join(part for part in (findings and f"FINDINGS: {findings}",
                                       impression and f"IMPRESSION: {impression}") if part)


def parse_boxes(text: str | None, manifest: Path, line: int) -> dict[str, list[float]] | None:
    """The optional `boxes` column: JSON {region: [x1, y1, x2, y2]} in fractions of the image."""
    if not (text or "").strip():
        return None
    try:
        boxes = json.loads(text)
        boxes = {region: [float(v) for v in box] for region, box in boxes.items()}
    except (ValueError, TypeError, AttributeError):
        raise LayoutError(f"{manifest}, line {line}: boxes must be JSON like "
                          '{"heart": [0.4, 0.45, 0.8, 0.8]}') from None
    unknown = [r for r, box in boxes.items() if r not in REGIONS or len(box) != 4]
    if unknown:
        raise LayoutError(f"{manifest}, line {line}: unknown region(s) or not 4 numbers: {', '.join(unknown)}")
    return boxes


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "mimic_cxr": MimicCxr,
    "mimic_cxr_jpg": MimicCxrJpg,
    "manifest": Manifest,
}


def open_layout(name: str, root, reports=None, **options) -> Layout:
    """The layout called `name` over the data at `root`."""
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name](root, reports, **options)
