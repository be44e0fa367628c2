"""Tiny MIMIC-CXR-style folders, DICOMs and CSVs written by hand (layout, index, dataset, evaluation tests), and
the gzipped-CSV reader the phantom and dataset tests check them with."""
from __future__ import annotations

import csv
import gzip
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from shared_models.vocab import CHEXPERT_LABELS

# The phantom of the trainer's smoke test and the relinkage audit (the session fixture phantom_200), composed from
# one list so they share one copy: 200 studies drawn at 256 px (both train at 128 px; the default 512 px takes
# about 4x as long to draw).
PHANTOM_200 = ["data=phantom", "data.studies=200", "data.image_height=256"]
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:
 There is a small left pleural effusion.  No pneumothorax.  The heart size is
 normal.

 IMPRESSION:
 Small left pleural effusion.
"""


def chest_pixels(rows: int = 72, cols: int = 60, border: int = 6, seed: int = 0) -> np.ndarray:
    """12-bit textured 'body' inside a black border `border` pixels wide."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((rows, cols), np.uint16)
    pixels[border:rows - border, border:cols - border] = rng.integers(
        1200, 4000, (rows - 2 * border, cols - 2 * border))
    return pixels


def write_dicom(path: Path, pixels: np.ndarray, view: str | None = "PA") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_gz_csv(path: Path) -> tuple[list[str], list[dict]]:
    """A gzipped CSV's header and its rows as dicts."""
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def study_spec(n_studies: int = 4, images_per_study: int = 2) -> list[dict]:
    """Deterministic patients/studies/images: views alternate PA / AP, the last image of each study LATERAL."""
    specs = []
    for s in range(n_studies):
        patient = f"1{s // 2:07d}"
        study = f"5{s:07d}"
        views = [("PA", "AP")[s % 2]] * (images_per_study - 1) + ["LATERAL"]
        images = [(f"img{s:03d}-{i}", views[i]) for i in range(images_per_study)]
        labels = ["" for _ in CHEXPERT_LABELS]
        labels[s % len(CHEXPERT_LABELS)] = "1.0"
        labels[(s + 3) % len(CHEXPERT_LABELS)] = "-1.0"
        specs.append(dict(patient=patient, study=study, images=images, labels=labels,
                          split=("train", "validate", "test")[s % 3], report=REPORT.replace("small", f"small ({s})")))
    return specs


def make_mimic(root: Path, specs: list[dict], gz: bool = False, reports: str = "tree",
               chexpert: bool = True, record_list: bool = True, extension: str = ".dcm") -> Path:
    """A MIMIC-CXR folder; reports 'tree' (beside the images), 'folder' (root/../reports) or 'zip'."""
    root.mkdir(parents=True, exist_ok=True)
    records, metadata, split_rows, label_rows = [], [], [], []
    report_files = {}
    for n, spec in enumerate(specs):
        patient, study = spec["patient"], spec["study"]
        study_dir = f"files/p{patient[:2]}/p{patient}/s{study}"
        for i, (image_id, view) in enumerate(spec["images"]):
            path = root / study_dir / f"{image_id}{extension}"
            if extension == ".dcm":
                write_dicom(path, chest_pixels(seed=n * 10 + i), view=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((chest_pixels(seed=n * 10 + i) >> 4).astype(np.uint8)).save(path)
            records.append([patient, study, image_id, f"{study_dir}/{image_id}.dcm"])
            metadata.append([image_id, patient, study, view, 72, 60])
            split_rows.append([image_id, study, patient, spec["split"]])
        label_rows.append([patient, study] + spec["labels"])
        report_files[f"{study_dir}.txt"] = spec["report"]
    if record_list:
        write_csv(root / "cxr-record-list.csv", ["subject_id", "study_id", "dicom_id", "path"], records, gz)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv",
              ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], metadata, gz)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz)
    if chexpert:
        write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_LABELS,
                  label_rows, gz)
    if reports == "tree":
        for name, text in report_files.items():
            (root / name).write_text(text)
    elif reports == "folder":
        for name, text in report_files.items():
            (root.parent / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
            (root.parent / "reports" / name).write_text(text)
    elif reports == "zip":
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as archive:
            for name, text in report_files.items():
                archive.writestr(f"mimic-cxr-reports/{name}", text)
    return root
