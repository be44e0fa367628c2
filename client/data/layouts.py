"""Site data layouts (MIMIC-CXR, MIMIC-CXR-JPG, CSV manifest) read into one list of studies and images."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from client.data.errors import Rejected
from client.data.files import open_regular, read_bounded, resolve_inside
from shared_models.vocab import CHEXPERT_LABELS, REGIONS

DEFAULT_VIEWS = ("PA", "AP")
MAX_REPORT_BYTES = 256 * 1024
# csv's own limit while parsing one field, so memory stays bounded: a longer field rejects its row
# with the line number. Far above any real value: an inline report over MAX_REPORT_BYTES is parsed
# and then refused as report_too_large, naming its line. (A field past this limit that spans lines
# can make csv resume inside it: the rows it then reads are refused or not found, none is trusted.)
MAX_FIELD_CHARS = 4 << 20
# Longest value the catalog's columns hold (paths: PATH_MAX); a longer one rejects its row.
MAX_CHARS = {"patient_id": 64, "study_id": 64, "image_id": 255, "split": 16, "view": 32, "site": 64,
             "subject_id": 64, "dicom_id": 255, "image_path": 4096, "mask_path": 4096, "path": 4096,
             "boxes": 4096}


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
    labels: list[float | None] | dict | None = None   # CHEXPERT_LABELS order, or a manifest's {column: value}; None blank
    report_key: str | None = None              # where the layout's report store finds the report
    report_text: str | None = None             # the report itself, when the layout carries it inline
    conflict: str | None = None                # why rows of this study disagree: then none of it is used
    origin: str = ""                           # where it was first listed (file and line), for messages

    def agree(self, where: str, patient_id: str, split: str | None, labels=None) -> None:
        """Merge another row of this study; a different patient, split or label value marks it conflicting.

        A blank is not a disagreement: a split or a label given on one row only is taken from that row.
        """
        differences = [f"{name} {new!r} (first listed {old!r} at {self.origin})"
                       for name, old, new in (("patient", self.patient_id, patient_id), ("split", self.split, split))
                       if new is not None and old is not None and new != old]
        if labels is not None and self.labels is not None:
            old, new = named_labels(self.labels), named_labels(labels)
            clashing = [name for name in old if old[name] is not None and new.get(name) is not None
                        and new[name] != old[name]]
            if clashing:
                differences.append(f"labels for {', '.join(clashing)} (first listed at {self.origin})")
            merged = {name: new.get(name) if value is None else value for name, value in old.items()}
            labels = merged if isinstance(self.labels, dict) else list(merged.values())
        self.split = self.split or split
        self.labels = labels if labels is not None else self.labels
        if differences and self.conflict is None:
            self.conflict = f"{where} gives study {self.study_id} " + ", ".join(differences)


def named_labels(labels: list | dict) -> dict:
    """{name: value} of either label form (CHEXPERT_LABELS order, or a manifest's own columns)."""
    return dict(labels) if isinstance(labels, dict) else dict(zip(CHEXPERT_LABELS, labels))


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in the layout's lists that was left out or looks wrong: a data warning, kept in the catalog."""

    code: str            # a REASON_CODES code (a row left out) or a WARNING_CODES one
    source: str          # the file (relative to the root when inside it) or the study
    line: int | None
    detail: str


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
        raise Rejected("nul_bytes", f"{name}: contains NUL bytes; is it a text file?")
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


def read_table(path: Path, required: Iterable[str] = (), problems: list[Problem] | None = None,
               values: Iterable[str] = (), source: str | None = None) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a plain or gzipped CSV whose header has the `required` columns.

    A row that cannot be used is left out with its line number in `problems` (without a list,
    it stops the read as a LayoutError): a field over MAX_FIELD_CHARS, more fields than the
    header, a NUL byte, bytes that are not UTF-8, or an empty value in one of `values`.
    """
    source = source or path.name
    left_out = problems if problems is not None else []
    rows = []
    limit = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        with open_regular(path) as raw:
            binary = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = csv.reader(text)
            header = [name.strip() for name in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise LayoutError(f"{path}: missing column(s) {', '.join(missing)}; "
                                  f"found {', '.join(header) or 'no header'}")
            capped = [(i, name, MAX_CHARS[name]) for i, name in enumerate(header) if name in MAX_CHARS]
            nonempty = [(header.index(name), name) for name in values]
            last = reader.line_num
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    left_out.append(Problem("bad_manifest_row", source, last + 1, f"cannot be read as CSV ({error})"))
                    last = reader.line_num
                    continue
                line, last = last + 1, reader.line_num
                if not fields:
                    continue
                problem = row_problem(fields, header, capped, nonempty)
                if problem is not None:
                    left_out.append(Problem(problem[0], source, line, problem[1]))
                    continue
                rows.append((line, dict(zip(header, fields + [""] * (len(header) - len(fields))))))
    except Rejected as error:
        raise LayoutError(f"{path}: cannot read this CSV ({error.detail})") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error) as error:
        raise LayoutError(f"{path}: cannot read this CSV ({error})") from None
    finally:
        csv.field_size_limit(limit)
    if problems is None and left_out:
        first = left_out[0]
        raise LayoutError(f"{path}, line {first.line}: {first.detail}")
    return rows


def row_problem(fields: list[str], header: list[str], capped: list[tuple[int, str, int]],
                required: list[tuple[int, str]]) -> tuple[str, str] | None:
    """(reason code, detail) when a CSV row cannot be used, naming the column.

    `capped`: (index, name, most characters) of the columns with a length limit; `required`:
    (index, name) of those that may not be empty.
    """
    if len(fields) > len(header):
        return "bad_manifest_row", (f"{len(fields)} fields but the header has {len(header)} columns "
                                    "(an unquoted comma?)")
    joined = "".join(fields)       # one scan of the whole row first: tables run to 400,000 rows
    if "\x00" in joined or not (joined.isascii() or is_utf8(joined)):
        for name, value in zip(header, fields):
            if "\x00" in value:
                return "nul_bytes", f"a NUL byte in column {name}; is the file binary or corrupted?"
            if not is_utf8(value):
                return "bad_manifest_row", f"column {name} is not UTF-8; save the file as UTF-8"
    for index, name, limit in capped:
        if index < len(fields) and len(fields[index]) > limit and len(fields[index].strip()) > limit:
            return "bad_manifest_row", f"column {name} holds {len(fields[index].strip())} characters, at most {limit}"
    empty = [name for index, name in required if index >= len(fields) or not fields[index].strip()]
    if empty:
        return "bad_manifest_row", f"empty {', '.join(empty)}"
    return None


def is_utf8(text: str) -> bool:
    """False when the text holds bytes that were not UTF-8 (read as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_label(value: str | None, name: str = "label") -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise Rejected("bad_manifest_row", f"column {name} holds {value[:40]!r}, not a number (blank = unknown)")
    return number


def labels_from_row(row: dict[str, str]) -> list[float | None]:
    return [parse_label(row.get(name), name) for name in CHEXPERT_LABELS]


# Manifest columns that say what a row is; every other column is a label: a CheXpert name (a number)
# or the site's own (`covid`: a number where it is one, else a class name). Blank = unknown.
MANIFEST_FIELDS = frozenset({"image_path", "image_id", "report", "findings", "impression", "patient_id",
                             "study_id", "view", "site", "split", "mask_path", "boxes"})
MAX_LABEL_CHARS = 64   # a longer value is free text, not a class name: kept out of the catalog


def manifest_label(value: str | None, name: str) -> float | str | None:
    if name in CHEXPERT_LABELS:
        return parse_label(value, name)
    value = (value or "").strip()
    if not value or len(value) > MAX_LABEL_CHARS:
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else None


def manifest_labels(row: dict[str, str], columns: list[str]) -> dict[str, float | str | None] | None:
    """{column: value} of a manifest row's label columns, or None when the manifest has none."""
    return {name: manifest_label(row.get(name), name) for name in columns} or None


# --- report stores ------------------------------------------------------------------------------

class FolderReports:
    """Reports as files: `<base>/files/pNN/pNNNNNNNN/sNNNNNNNN.txt` (or the same path without `files/`).

    A report must resolve inside `base` (unless `allow_outside`), be a regular file and fit `max_bytes`.
    """

    def __init__(self, base: Path, allow_outside: bool = False):
        self.base, self.allow_outside = Path(os.path.realpath(base)), allow_outside
        self.folders: dict[str, str] = {}    # real path of each folder (the read re-checks what it opened)

    def read(self, key: str, max_bytes: int = MAX_REPORT_BYTES) -> bytes | None:
        for listed in (key, str(PurePosixPath(key).relative_to("files"))):
            try:
                path = resolve_inside(self.base, listed, self.allow_outside, self.folders)
                return read_bounded(path, max_bytes, "report_too_large",
                                    inside=None if self.allow_outside else self.base)
            except Rejected as error:
                if error.code != "file_not_found":
                    raise
        return None


class ZipReports:
    """Reports read straight from `mimic-cxr-reports.zip`, whatever folder prefix its entries carry."""

    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(open_regular(path))
        except Rejected as error:
            raise LayoutError(f"{path}: not a readable zip of reports ({error.detail})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            raise LayoutError(f"{path}: not a readable zip of reports ({error})") from None
        self.path = path
        # Keyed by the path from `files/` on (or the whole name when there is no `files/`).
        self.names = {}
        for name in self.zip.namelist():
            if name.endswith(".txt"):
                parts = PurePosixPath(name).parts
                tail = parts[parts.index("files"):] if "files" in parts else ("files",) + parts[-3:]
                self.names[str(PurePosixPath(*tail))] = name

    def read(self, key: str, max_bytes: int = MAX_REPORT_BYTES) -> bytes | None:
        name = self.names.get(key)
        if name is None:
            return None
        entry = self.zip.getinfo(name)
        if entry.file_size > max_bytes:
            raise Rejected("report_too_large", f"{self.path}!{name}: {entry.file_size} bytes, limit {max_bytes}")
        try:
            with self.zip.open(entry) as handle:
                data = handle.read(max_bytes + 1)   # the entry's stated size may lie (a zip bomb)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as error:
            raise Rejected("unreadable_text", f"{self.path}!{name}: {error}") from None
        if len(data) > max_bytes:
            raise Rejected("report_too_large", f"{self.path}!{name}: inflates past {max_bytes} bytes")
        return data


def open_reports(path: Path, allow_outside: bool = False) -> FolderReports | ZipReports:
    if not path.exists():
        raise LayoutError(f"{path}: reports path does not exist; give a folder holding "
                          "files/pNN/pNNNNNNNN/sNNNNNNNN.txt or mimic-cxr-reports.zip")
    return FolderReports(path, allow_outside) if path.is_dir() else ZipReports(path)


# --- layouts ------------------------------------------------------------------------------------

class Layout:
    """A site's data: `studies()` lists what there is, `read_report(study)` returns a report's text."""

    name = ""

    def __init__(self, root: str | os.PathLike, reports: str | os.PathLike | None = None,
                 max_report_bytes: int = MAX_REPORT_BYTES, allow_outside_root: bool = False):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise LayoutError(f"{self.root}: data root does not exist or is not a folder; "
                              f"expected the {self.name} layout here")
        self.max_report_bytes = max_report_bytes
        # Paths listed by the data must stay inside the root; a site with data on shared storage opts out.
        self.allow_outside_root = allow_outside_root
        self.problems: list[Problem] = []    # filled by studies(): rows left out, conflicting studies
        self.report_stores = self._report_stores(Path(reports).expanduser() if reports else None)

    def _report_stores(self, reports: Path | None) -> list:
        return [open_reports(reports, self.allow_outside_root)] if reports else []

    def studies(self) -> list[StudyRecord]:
        raise NotImplementedError

    def read_report(self, study: StudyRecord) -> str:
        if study.report_text is not None:
            return decode_report(study.report_text.encode("utf-8", "surrogateescape"),
                                 f"the report of study {study.study_id} ({study.origin})", self.max_report_bytes)
        if study.report_key is not None:
            for store in self.report_stores:
                data = store.read(study.report_key, self.max_report_bytes)
                if data is not None:
                    return decode_report(data, study.report_key, self.max_report_bytes)
        raise Rejected("no_report", f"no report {study.report_key or ''} for study {study.study_id}".strip())

    def source(self, path: Path) -> str:
        """A file's name for messages and the catalog: relative to the root when inside it."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def note_conflicts(self, studies: Iterable[StudyRecord]) -> None:
        self.problems += [Problem("conflicting_study", study.study_id, None, study.conflict)
                          for study in studies if study.conflict]


class MimicCxr(Layout):
    """PhysioNet MIMIC-CXR (DICOM release): files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm + CSVs."""

    name = "mimic_cxr"
    extension = ".dcm"

    def __init__(self, root, reports=None, max_report_bytes=MAX_REPORT_BYTES, allow_outside_root=False):
        super().__init__(root, reports, max_report_bytes, allow_outside_root)
        if not (self.root / "files").is_dir():
            raise LayoutError(f"{self.root}: no files/ folder; the {self.name} layout expects "
                              f"files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>{self.extension}")

    def _report_stores(self, reports):
        if reports:
            return [open_reports(reports, self.allow_outside_root)]
        stores = [FolderReports(self.root, self.allow_outside_root)]
        if (self.root / "mimic-cxr-reports.zip").is_file():
            stores.append(ZipReports(self.root / "mimic-cxr-reports.zip"))
        return stores

    def studies(self) -> list[StudyRecord]:
        self.problems = []
        metadata = self._table("mimic-cxr-2.0.0-metadata", ("dicom_id", "ViewPosition"), ("dicom_id",))
        views = {row["dicom_id"]: (row["ViewPosition"].strip().upper() or None) for _, row in metadata or []}
        split_rows = self._table("mimic-cxr-2.0.0-split", ("dicom_id", "split"), ("dicom_id",))
        splits = {row["dicom_id"]: row["split"].strip() or None for _, row in split_rows or []}
        labels, label_conflicts = self._labels()

        studies: dict[str, StudyRecord] = {}
        for where, patient_id, study_id, image_id, path in self._image_list(metadata):
            split = splits.get(image_id)
            study = studies.get(study_id)
            if study is None:
                labelled_patient, label_origin, study_labels = labels.get(study_id, (patient_id, "", None))
                study = studies[study_id] = StudyRecord(
                    patient_id, study_id, split=split, labels=study_labels, origin=where,
                    report_key=f"files/p{patient_id[:2]}/p{patient_id}/s{study_id}.txt",
                    conflict=label_conflicts.get(study_id))
                if labelled_patient != patient_id and study.conflict is None:
                    study.conflict = (f"{label_origin} labels study {study_id} for patient {labelled_patient}, "
                                      f"{where} lists it for patient {patient_id}")
            else:
                study.agree(where, patient_id, split)
            study.images.append(ImageRecord(image_id, path, view=views.get(image_id)))
        self.note_conflicts(studies.values())
        return list(studies.values())

    def _labels(self) -> tuple[dict[str, tuple[str, str, list]], dict[str, str]]:
        """study id -> (patient id, where, labels), and study id -> why its label rows disagree."""
        stem = "mimic-cxr-2.0.0-chexpert" if find_table(self.root, "mimic-cxr-2.0.0-chexpert") \
            else "mimic-cxr-2.0.0-negbio"
        labels, conflicts = {}, {}
        for line, row in self._table(stem, ("subject_id", "study_id"), ("subject_id", "study_id")) or []:
            where = f"{stem} line {line}"
            try:
                values = labels_from_row(row)
            except Rejected as error:
                self.problems.append(Problem(error.code, stem, line, error.detail))
                continue
            study, patient = row["study_id"].strip(), row["subject_id"].strip()
            first = labels.setdefault(study, (patient, where, values))
            if (first[0], first[2]) != (patient, values) and study not in conflicts:
                conflicts[study] = (f"{where} gives study {study} patient {patient} and labels {values}; "
                                    f"{first[1]} gave patient {first[0]} and labels {first[2]}")
        return labels, conflicts

    def _table(self, stem: str, required, values=()) -> list[tuple[int, dict[str, str]]] | None:
        path = find_table(self.root, stem)
        return read_table(path, required, self.problems, values, self.source(path)) if path else None

    def _image_list(self, metadata) -> Iterable[tuple[str, str, str, str, str]]:
        """(where, patient_id, study_id, image_id, path) from the record list, else the metadata, else files/."""
        ids = ("subject_id", "study_id", "dicom_id")
        records = self._table("cxr-record-list", ids + ("path",), ids + ("path",))
        if records is not None:
            for line, row in records:
                path = str(PurePosixPath(row["path"].strip()).with_suffix(self.extension))
                yield f"cxr-record-list line {line}", *(row[name].strip() for name in ids), path
        elif metadata and {"subject_id", "study_id"} <= set(metadata[0][1]):
            for line, row in metadata:
                patient, study, dicom = (row[name].strip() for name in ids)
                if not (patient and study):
                    self.problems.append(Problem("bad_manifest_row", "mimic-cxr-2.0.0-metadata", line,
                                                 "empty subject_id or study_id"))
                    continue
                yield (f"mimic-cxr-2.0.0-metadata line {line}", patient, study, dicom,
                       f"files/p{patient[:2]}/p{patient}/s{study}/{dicom}{self.extension}")
        else:
            for patient, study, dicom, path in self._walk():
                yield path, patient, study, dicom, path

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

    def __init__(self, root, reports=None, max_report_bytes=MAX_REPORT_BYTES, manifest="manifest.csv",
                 allow_outside_root=False):
        super().__init__(root, None, max_report_bytes, allow_outside_root)
        self.manifest = self.root / manifest
        if not self.manifest.is_file():
            raise LayoutError(f"{self.manifest}: manifest not found; expected a CSV with columns image_path "
                              "and report (or findings and impression)")

    def studies(self) -> list[StudyRecord]:
        self.problems = []
        source = self.source(self.manifest)
        rows = read_table(self.manifest, ("image_path",), self.problems, ("image_path",), source)
        columns = set(rows[0][1]) if rows else set()
        if rows and "report" not in columns and not {"findings", "impression"} & columns:
            raise LayoutError(f"{self.manifest}: needs a report column, or findings and/or impression columns")
        label_columns = [c for c in (rows[0][1] if rows else {}) if c is not None and c not in MANIFEST_FIELDS]
        studies: dict[str, StudyRecord] = {}
        for number, row in rows:
            where = f"{source} line {number}"
            try:
                boxes = parse_boxes(row.get("boxes"), where)
                labels = manifest_labels(row, label_columns)
            except Rejected as error:
                self.problems.append(Problem(error.code, source, number, error.detail))
                continue
            path = self._relative(row["image_path"].strip())
            study_id = (row.get("study_id") or "").strip() or derived_id("s", path)
            patient_id = (row.get("patient_id") or "").strip() or derived_id("p", study_id)
            split = (row.get("split") or "").strip() or None
            study = studies.get(study_id)
            if study is None:
                study = studies[study_id] = StudyRecord(patient_id, study_id, split=split, labels=labels,
                                                        report_text=report_from_row(row), origin=where)
            else:
                study.agree(where, patient_id, split, labels)
            study.images.append(ImageRecord(
                image_id=(row.get("image_id") or "").strip() or str(PurePosixPath(path).with_suffix("")),
                path=path,
                view=(row.get("view") or "").strip().upper() or None,
                site=(row.get("site") or "").strip() or None,
                mask_path=(row.get("mask_path") or "").strip() or None,
                boxes=boxes))
        self.note_conflicts(studies.values())
        return list(studies.values())

    def _relative(self, image_path: str) -> str:
        path = Path(image_path)
        if path.is_absolute():
            try:
                return path.resolve().relative_to(self.root).as_posix()
            except ValueError:
                return path.as_posix()  # outside the root: the index refuses it unless allowed
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


def parse_boxes(text: str | None, where: str) -> dict[str, list[float]] | None:
    """The optional `boxes` column: JSON {region: [x1, y1, x2, y2]} in fractions of the image."""
    if not (text or "").strip():
        return None
    try:
        boxes = json.loads(text)
        boxes = {region: [float(v) for v in box] for region, box in boxes.items()}
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise Rejected("bad_manifest_row", f"{where}: boxes must be JSON like "
                                           '{"heart": [0.4, 0.45, 0.8, 0.8]}') from None
    unknown = [r for r, box in boxes.items() if r not in REGIONS or len(box) != 4]
    if unknown:
        raise Rejected("bad_manifest_row", f"{where}: unknown region(s) or not 4 numbers: {', '.join(unknown)}")
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
