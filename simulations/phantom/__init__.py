"""The synthetic phantom: chest radiographs with known findings, masks and reports in the MIMIC-CXR layouts."""
from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shared_models.vocab import CHEXPERT_LABELS

from .anatomy import expose, frontal_density, lateral_density, sample_thorax
from .dicom import PHOTOMETRICS, TRANSFER_SYNTAXES, DicomHeader, write_dicom
from .findings import Canvas, Finding, draw_findings, heart_width_for, sample_findings, truth_labels
from .reports import write_report

__all__ = ["generate_phantom"]

SPLITS = ("train", "validate", "test")
EXAMS = {  # view -> (PerformedProcedureStepDescription, technique, view code meaning, orientation)
    "PA": ("CHEST (PA AND LAT)", "Chest PA and lateral", "postero-anterior", "Erect"),
    "AP": ("CHEST (PORTABLE AP)", "Portable AP chest radiograph", "antero-posterior", "Recumbent"),
}
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


@dataclass
class StudyPlan:
    """Everything decided about a study before any pixel is drawn."""

    index: int
    subject_id: str
    study_id: str
    split: str
    view: str                       # of the frontal image
    dicom_ids: list[str]            # frontal first, then the lateral if any
    study_date: str
    study_time: str
    has_prior: bool
    findings: list[Finding] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return f"files/p{self.subject_id[:2]}/p{self.subject_id}/s{self.study_id}"

    def views(self) -> list[str]:
        return [self.view] + ["LATERAL"] * (len(self.dicom_ids) - 1)


def _unique(seen: set, draw) -> str:
    while (value := draw()) in seen:
        pass
    seen.add(value)
    return value


def plan_studies(studies: int, seed: int, held_out: float = 0.1) -> list[StudyPlan]:
    """Patients with one or two studies, MIMIC-like ids, a patient-level split, findings and views."""
    rng = np.random.default_rng([seed, 0])
    seen: set[str] = set()
    patients: list[list[StudyPlan]] = []
    count = 0
    while count < studies:
        subject = _unique(seen, lambda: str(rng.integers(10_000_000, 20_000_000)))
        n = 2 if rng.random() < 0.25 and count + 2 <= studies else 1
        day = int(rng.integers(0, 30_000))
        visits = []
        for k in range(n):
            date = np.datetime64("2110-01-01") + np.timedelta64(day + k * int(rng.integers(10, 400)), "D")
            findings = sample_findings(rng)
            device = any(f.finding == "support_device" for f in findings)
            view = "AP" if rng.random() < (0.7 if device else 0.25) else "PA"
            lateral = rng.random() < (0.25 if view == "PA" else 0.05)
            dicoms = [_unique(seen, lambda: "-".join(f"{x:08x}" for x in rng.integers(0, 2**32, size=5)))
                      for _ in range(1 + lateral)]
            hour, minute, second, millis = rng.integers([0, 0, 0, 0], [24, 60, 60, 1000])
            visits.append(StudyPlan(
                index=count + k, subject_id=subject,
                study_id=_unique(seen, lambda: str(rng.integers(50_000_000, 60_000_000))),
                split="", view=view, dicom_ids=dicoms, study_date=str(date).replace("-", ""),
                study_time=f"{hour:02d}{minute:02d}{second:02d}.{millis:03d}", has_prior=k > 0, findings=findings))
        patients.append(visits)
        count += n
    # every split gets patients even in a small phantom: `held_out` of them test, as many validate, the rest train
    order = rng.permutation(len(patients))
    held_out = max(1, round(held_out * len(patients))) if len(patients) >= 3 else 0
    for rank, p in enumerate(order):
        split = "test" if rank < held_out else "validate" if rank < 2 * held_out else "train"
        for study in patients[p]:
            study.split = split
    return [study for visits in patients for study in visits]


def _write_gz_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.getvalue().encode())


def _save_png(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, optimize=False)


def render_study(rng: np.random.Generator, plan: StudyPlan, size: int,
                 finding_contrast: float = 1.0) -> tuple[list, list, float]:
    """The study's images (frontal first, float [H, W] in [0, 1]), one mask per finding on the
    frontal grid, and the pixel spacing in mm. Nodule and mass sizes in mm are added to their detail.
    `finding_contrast` scales every finding's change of density (1.0: the calibrated, subtle look; the
    enlarged heart is anatomy and stays as it is); masks and reports do not change with it."""
    rows, cols = size, 2 * int(round(size * rng.uniform(0.85, 1.0) / 2))
    thorax = sample_thorax(rng, rows, cols, heart_width_for(rng, plan.findings))
    spacing = rng.uniform(300.0, 360.0) / thorax.size[0]
    u, v = thorax.grid()
    density, markings = frontal_density(rng, thorax)
    normal = density.copy() if finding_contrast != 1.0 else None
    masks = draw_findings(rng, Canvas(thorax, u, v, density, markings), plan.findings)
    if normal is not None:
        density = normal + finding_contrast * (density - normal)
    for f in plan.findings:
        if "size_fraction" in f.detail:
            f.detail["mm"] = f.detail.pop("size_fraction") * thorax.size[0] * spacing
    images = [expose(rng, density, u, v)]
    if len(plan.dicom_ids) > 1:
        side = sample_thorax(rng, rows, cols)
        images.append(expose(rng, lateral_density(rng, side), *side.grid()))
    return images, masks, spacing


class _Writer:
    """Collects the CSV rows and ground truth while the study folders are written."""

    def __init__(self, root: Path, seed: int, size: int, finding_contrast: float):
        self.root, self.seed, self.size, self.finding_contrast = root, seed, size, finding_contrast
        self.records, self.study_rows, self.metadata, self.split_rows, self.chexpert = [], [], [], [], []
        self.truth: dict = {"seed": seed, "finding_contrast": finding_contrast, "studies": {}}

    def study(self, plan: StudyPlan) -> None:
        rng = np.random.default_rng([self.seed, 1, plan.index])
        images, masks, spacing = render_study(rng, plan, self.size, self.finding_contrast)
        rows, cols = images[0].shape
        description, technique, view_meaning, orientation = EXAMS[plan.view]
        findings = plan.findings
        folder = self.root / plan.folder
        for dicom_id, view, image in zip(plan.dicom_ids, plan.views(), images):
            path = folder / f"{dicom_id}.dcm"
            header = DicomHeader(plan.subject_id, plan.study_id, dicom_id, view, plan.study_date, plan.study_time,
                                 description, spacing)
            write_dicom(path, image, header, rng,
                        transfer_syntax=TRANSFER_SYNTAXES[rng.choice(4, p=[0.35, 0.25, 0.15, 0.25])],
                        photometric=PHOTOMETRICS[rng.choice(3, p=[0.5, 0.35, 0.15])])
            Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(path.with_suffix(".jpg"), quality=95)
            ids = {"subject_id": plan.subject_id, "study_id": plan.study_id}
            self.records.append({**ids, "dicom_id": dicom_id, "path": f"{plan.folder}/{dicom_id}.dcm"})
            self.metadata.append({"dicom_id": dicom_id, **ids, "PerformedProcedureStepDescription": description,
                                  "ViewPosition": view, "Rows": rows, "Columns": cols, "StudyDate": plan.study_date,
                                  "StudyTime": plan.study_time, "ProcedureCodeSequence_CodeMeaning": description,
                                  "ViewCodeSequence_CodeMeaning": "lateral" if view == "LATERAL" else view_meaning,
                                  "PatientOrientationCodeSequence_CodeMeaning": orientation})
            self.split_rows.append({"dicom_id": dicom_id, **ids, "split": plan.split})

        frontal = plan.dicom_ids[0]
        truth_findings = []
        for f, mask in zip(findings, masks):
            where = f.region or ("bilateral" if f.finding == "edema" else "none")
            name = f"masks/{frontal}_{f.finding}_{where}.png"
            _save_png(self.root / name, mask)
            truth_findings.append({"finding": f.finding, "region": f.region, "hedged": f.hedged,
                                   "masks": {frontal: name}})

        report, labels = write_report(rng, findings, description, technique, plan.has_prior)
        (self.root / f"{plan.folder}.txt").write_text(report)
        self.study_rows.append({"subject_id": plan.subject_id, "study_id": plan.study_id, "path": f"{plan.folder}.txt"})
        self.chexpert.append({"subject_id": plan.subject_id, "study_id": plan.study_id,
                              **{k: "" if val is None else f"{val:.1f}" for k, val in labels.items()}})
        self.truth["studies"][plan.study_id] = {
            "subject_id": plan.subject_id, "split": plan.split, "dicom_ids": plan.dicom_ids,
            "view_positions": dict(zip(plan.dicom_ids, plan.views())),
            "findings": truth_findings, "labels": truth_labels(findings)}

    def merge(self, other: "_Writer") -> None:
        """Take another writer's rows (a worker's share of the studies), after this writer's."""
        for name in ("records", "study_rows", "metadata", "split_rows", "chexpert"):
            getattr(self, name).extend(getattr(other, name))
        self.truth["studies"].update(other.truth["studies"])

    def tables(self) -> None:
        ids = ["subject_id", "study_id"]
        _write_gz_csv(self.root / "cxr-record-list.csv.gz", [*ids, "dicom_id", "path"], self.records)
        _write_gz_csv(self.root / "cxr-study-list.csv.gz", [*ids, "path"], self.study_rows)
        _write_gz_csv(self.root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, self.metadata)
        _write_gz_csv(self.root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                      self.split_rows)
        _write_gz_csv(self.root / "mimic-cxr-2.0.0-chexpert.csv.gz", [*ids, *CHEXPERT_LABELS], self.chexpert)
        (self.root / "ground_truth.json").write_text(json.dumps(self.truth, indent=1, sort_keys=True) + "\n")


def _write_share(root: Path, seed: int, size: int, finding_contrast: float, plans: list[StudyPlan]) -> _Writer:
    writer = _Writer(root, seed, size, finding_contrast)
    for plan in plans:
        writer.study(plan)
    return writer


def generate_phantom(out: str | Path, studies: int, seed: int = 0, size: int = 512, progress: bool = False,
                     held_out: float = 0.1, finding_contrast: float = 1.0, workers: int = 1) -> Path:
    """Write a `studies`-study phantom to `out` (absent or empty) and return it; same seed and
    arguments, same bytes, whatever the number of `workers` (processes; each study draws from its own
    generator). `held_out` of the patients go to `test` and as many to `validate`; `finding_contrast` scales
    how strongly the findings show (see `render_study`). Built in a sibling `.partial` folder and renamed, so
    a killed run never leaves a phantom that looks complete."""
    out = Path(out)
    if studies < 1:
        raise ValueError(f"--studies must be >= 1, got {studies}")
    if not 0.0 < held_out < 0.5:
        raise ValueError(f"--held-out must be in (0, 0.5): that share of patients goes to test and to validate, "
                         f"got {held_out}")
    if size < 64:
        raise ValueError(f"--size must be >= 64 pixels, got {size}")
    if not 0.0 < finding_contrast <= 10.0:
        raise ValueError(f"--finding-contrast must be in (0, 10]: it multiplies each finding's density, "
                         f"got {finding_contrast}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; remove it or choose another --out")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "masks").mkdir(parents=True)
    writer = _Writer(partial, seed, size, finding_contrast)
    plans = plan_studies(studies, seed, held_out)
    if workers > 1:   # chunks in study order, merged in that order: the tables are the serial run's
        chunks = [plans[i:i + 32] for i in range(0, len(plans), 32)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            shares = pool.map(_write_share, *zip(*[(partial, seed, size, finding_contrast, chunk) for chunk in chunks]))
            for share in shares:
                writer.merge(share)
    else:
        if progress:
            from tqdm import tqdm
            plans = tqdm(plans, desc="phantom studies", unit="study")
        for plan in plans:
            writer.study(plan)
    writer.tables()
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
