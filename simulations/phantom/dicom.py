"""Write one phantom image as a DICOM file the way real exports vary: photometric, transfer syntax, LUTs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, PYDICOM_IMPLEMENTATION_UID,
                         RLELossless, generate_uid)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)
# MONOCHROME1 stores inverted values; some exports also carry Presentation LUT Shape INVERSE,
# which a reader must not apply as a second inversion.
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME1+INVERSE")


@dataclass
class DicomHeader:
    """The identifiers and acquisition facts one image's header carries."""

    subject_id: str
    study_id: str
    dicom_id: str
    view_position: str
    study_date: str
    study_time: str
    description: str
    pixel_spacing: float      # mm


def _uid(*parts: str) -> str:
    return generate_uid(prefix="2.25.", entropy_srcs=["fedcxr-phantom", *parts])


def write_dicom(path: Path, image: np.ndarray, header: DicomHeader, rng: np.random.Generator,
                transfer_syntax: str, photometric: str) -> None:
    """Store `image` (float [H, W] in [0, 1], air dark) as 12-bit pixels with a rescale and a window
    that map them back to the same display."""
    low, high = int(rng.integers(0, 300)), int(rng.integers(3000, 4096))
    stored = np.round(image * (high - low) + low).astype(np.uint16)
    if photometric.startswith("MONOCHROME1"):
        stored = (4095 - stored).astype(np.uint16)
    slope, intercept = 1.0, 0.0
    if rng.random() < 0.4:
        slope, intercept = float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([-1024.0, 0.0]))
    lo, hi = np.percentile(stored[::4, ::4], [0.5, 99.5]) * slope + intercept
    widen = rng.uniform(1.0, 1.15)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = _uid(header.dicom_id)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(header.study_id), _uid(header.study_id, header.view_position)
    ds.Modality, ds.PatientID, ds.PatientName = "DX", header.subject_id, "___"
    ds.StudyID, ds.AccessionNumber = header.study_id, ""
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = header.study_date, header.study_time, 1, 1
    ds.PerformedProcedureStepDescription = ds.StudyDescription = header.description
    ds.ViewPosition = header.view_position
    ds.PatientOrientation = ["L", "F"] if header.view_position != "LATERAL" else ["A", "F"]
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{header.pixel_spacing:.4f}"] * 2
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric.split("+")[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{(hi - lo) * widen:.1f}"
    if photometric.endswith("INVERSE"):
        ds.PresentationLUTShape = "INVERSE"
    elif photometric == "MONOCHROME2" and rng.random() < 0.5:
        ds.PresentationLUTShape = "IDENTITY"
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    else:
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
