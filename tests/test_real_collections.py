"""The documented real-collection commands, run as written, on fixtures in each collection's own layout.

Every fixture is built here from the real DICOMs in ../shared/data/dicom (pixels varied per image, a bright
patch where the image is positive) and real report text from ../shared/data/iu-xray-reports, written in
the layout of the collection it stands for. The commands are read from docs/simulation.md and
docs/evaluation.md, so a doc command that stops working, or a doc that drops one, fails here; only the
placeholders (/data/..., CKPT) are replaced and a few keys the command does not set are added to keep the
run tiny (SMALL_*).
"""
from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers.deployment import needs_flwr
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
CR_DICOM = SHARED_DATA / "dicom" / "cr-chest-mono1-10bit-nometa.dcm"
J2K_DICOM = SHARED_DATA / "dicom" / "dx-chest-mono2-j2k-16bit.dcm"
IU_TGZ = SHARED_DATA / "iu-xray-reports" / "iu-reports-dev.tgz"
pytestmark = [
    pytest.mark.skipif(not (CR_DICOM.is_file() and IU_TGZ.is_file()), reason="../shared/data is not present"),
    needs_flwr,
]
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# keys the doc commands leave at their defaults, set so that a run takes seconds: one round of one local step
# at batch 4 on 1 core, no centralized baseline, a 20-iteration probe at 100 % labels with one seed
SMALL_SIMULATION = ["federation.rounds=1", "federation.local_steps=1", "train.batch_size=4",
                    "client_resources.num_cpus=1", "compare_centralized=false", "label_fraction=[1.0]",
                    "probe.max_iter=20"]
SMALL_EVALUATION = ["seeds=1", "label_fraction=[1.0]", "probe.max_iter=20", "segmentation.epochs=1",
                    "segmentation.overlays=1", "threads=1"]
LABEL = "Pleural Effusion"   # the CheXpert label the fixtures' bright patch stands for
SPLITS = ["train"] * 16 + ["validate"] * 8 + ["test"] * 8   # one patient, one study per entry


# ------------------------------------------------------------------------------------- real inputs
def iu_reports(count: int) -> list[str]:
    """`count` IU reports as MIMIC-style free text (FINDINGS / IMPRESSION sections), in file order."""
    texts = []
    with tarfile.open(IU_TGZ) as archive:
        for member in archive:
            if not member.isfile():
                continue
            xml = archive.extractfile(member).read().decode("utf-8", "replace")
            sections = dict(re.findall(r'<AbstractText Label="(\w+)">(.*?)</AbstractText>', xml, re.S))
            if sections.get("FINDINGS") and sections.get("IMPRESSION"):
                texts.append(f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
                             f" FINDINGS: {sections['FINDINGS'].strip()}\n\n IMPRESSION: {sections['IMPRESSION'].strip()}\n")
            if len(texts) == count:
                return texts
    raise AssertionError(f"{IU_TGZ} has fewer than {count} reports with findings and impression")


class Pixels:
    """The real CR radiograph's 10-bit pixels (MONOCHROME1, 440 x 440, no file meta), varied per image."""

    def __init__(self):
        import pydicom

        self.dataset = pydicom.dcmread(CR_DICOM, force=True)
        self.raw = np.frombuffer(self.dataset.PixelData, "<u2").reshape(440, 440).astype(np.int32)

    def variant(self, index: int, positive: bool, size: int = 440) -> np.ndarray:
        rng = np.random.default_rng(index)
        image = self.raw + rng.integers(-20, 21, self.raw.shape)
        if positive:   # MONOCHROME1: lower is brighter; the patch sits low in the right lung field
            image[200:280, 60:180] -= 250
        image = np.clip(image, 0, 1023)
        if size != 440:
            image = np.kron(image, np.ones((3, 3), dtype=np.int32))[:size, :size] if size <= 1320 else image
            image = np.pad(image, ((0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1]))), mode="edge")
        return image.astype(np.uint16)

    def write_dicom(self, path: Path, pixels: np.ndarray, patient: str) -> None:
        from pydicom.uid import generate_uid

        path.parent.mkdir(parents=True, exist_ok=True)
        ds = copy.deepcopy(self.dataset)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.PatientID, ds.SOPInstanceUID = patient, generate_uid()
        ds.save_as(path, enforce_file_format=False)   # as the original: no file meta header

    @staticmethod
    def write_8bit(path: Path, pixels: np.ndarray) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        display = 255 - (pixels.astype(np.float32) * 255 / 1023)   # MONOCHROME1 shown as a JPG/PNG would be
        Image.fromarray(display.clip(0, 255).astype(np.uint8)).save(path)


def _gz_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


CHEXPERT_14 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
               "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
               "Pneumothorax", "Support Devices"]


def _labels(positive: bool) -> list[str]:
    """The bright patch as Pleural Effusion (1.0 / 0.0), No Finding its opposite, every other label blank."""
    known = {LABEL: positive, "No Finding": not positive}
    return [("1.0" if known[name] else "0.0") if name in known else "" for name in CHEXPERT_14]


# ------------------------------------------------------------------------------------------ layouts
def build_mimic(base: Path, pixels: Pixels, reports: list[str]) -> dict[str, Path]:
    """The MIMIC-CXR DICOM release (files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm, cxr-record-list.csv.gz,
    cxr-study-list.csv.gz; reports in mimic-cxr-reports.zip, downloaded beside it) with the JPG release's
    gzipped metadata, split and chexpert tables copied in; and the JPG release itself (files/ with .jpg, the
    gzipped tables, no reports)."""
    dicom_root, jpg_root, zip_path = base / "mimic-cxr" / "2.1.0", base / "mimic-cxr-jpg" / "2.1.0", base / "mimic-cxr-reports.zip"
    records, studies, metadata, split_rows, label_rows = [], [], [], [], []
    with zipfile.ZipFile(zip_path, "w") as archive:
        for index, split in enumerate(SPLITS):
            patient, study = f"{10000100 + index}", f"{50000100 + index}"
            positive = index % 2 == 1
            folder = f"files/p{patient[:2]}/p{patient}/s{study}"
            dicoms = [f"{index:04d}aaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee"]
            image = pixels.variant(index, positive)
            pixels.write_dicom(dicom_root / folder / f"{dicoms[0]}.dcm", image, patient)
            pixels.write_8bit(jpg_root / folder / f"{dicoms[0]}.jpg", image)
            if index == len(SPLITS) - 1:   # one test study also has the real 16-bit JPEG 2000 radiograph
                dicoms.append("ffff0000-j2k16bit-real-dx-chest00000000")
                target = dicom_root / folder / f"{dicoms[1]}.dcm"
                target.write_bytes(J2K_DICOM.read_bytes())
            for dicom in dicoms:
                records.append([patient, study, dicom, f"{folder}/{dicom}.dcm"])
                metadata.append([dicom, patient, study, "CHEST (PA AND LAT)", "PA", 440, 440, 21800101, 120000.0])
                split_rows.append([dicom, study, patient, split])
            studies.append([patient, study, f"{folder}.txt"])
            label_rows.append([patient, study, *_labels(positive)])
            archive.writestr(f"mimic-cxr-reports/{folder}.txt", reports[index])
    jpg_metadata = [row for row in metadata if "j2k" not in row[0]]
    for root, meta, splits in ((dicom_root, metadata, split_rows),
                               (jpg_root, jpg_metadata, [r for r in split_rows if "j2k" not in r[0]])):
        _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id",
                "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"], meta)
        _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits)
        _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_14], label_rows)
    _gz_csv(dicom_root / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
    _gz_csv(dicom_root / "cxr-study-list.csv.gz", ["subject_id", "study_id", "path"], studies)
    return {"mimic_cxr": dicom_root, "mimic_cxr_jpg": jpg_root, "reports_zip": zip_path}


MANIFEST_SITES = {"hospital_a": 12, "hospital_b": 12, "hospital_c": 8}   # hospital_c's notes are all missing


def build_manifest(root: Path, pixels: Pixels, reports: list[str]) -> Path:
    """A hospital export as a CSV manifest: PNG images, its own `covid` label column (no CheXpert columns), a
    `site` column, free-text reports that are blank for one whole hospital, and masks for some images only."""
    from PIL import Image

    rows, index = [], 0
    for site, count in MANIFEST_SITES.items():
        for k in range(count):
            positive = index % 2 == 1
            split = "train" if k < count // 2 else ("validate" if k < 3 * count // 4 else "test")
            image = pixels.variant(500 + index, positive)
            path = f"images/{site}/{index:03d}.png"
            pixels.write_8bit(root / path, image)
            mask = ""
            if index % 3 != 2:   # two thirds have a mask file: the patch, or an empty mask
                mask = f"masks/{index:03d}.png"
                (root / "masks").mkdir(parents=True, exist_ok=True)
                drawn = np.zeros(image.shape, dtype=np.uint8)
                if positive:
                    drawn[200:280, 60:180] = 255
                Image.fromarray(drawn).save(root / mask)
            report = "" if site == "hospital_c" else reports[100 + index]
            rows.append([path, report, f"{site}-{index:03d}", f"{site}-s{index:03d}", "PA", site, split,
                         "1" if positive else "0", mask])
            index += 1
    _csv(root / "manifest.csv", ["image_path", "report", "patient_id", "study_id", "view", "site", "split", "covid",
                                 "mask_path"], rows)
    return root


def build_rsna(root: Path, pixels: Pixels) -> Path:
    """RSNA Pneumonia: stage_2_train_labels.csv (one row per box) and stage_2_train_images/<patientId>.dcm,
    1024 x 1024 like the release's."""
    rows = []
    for index in range(12):
        positive = index % 2 == 1
        patient = f"{index:04d}-rsna-{'p' if positive else 'n'}"
        pixels.write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", pixels.variant(700 + index, positive, 1024),
                           patient)
        rows += [[patient, 180, 600, 360, 240, 1]] if positive else [[patient, "", "", "", "", 0]]
    _csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root


def build_siim(root: Path, pixels: Pixels) -> Path:
    """SIIM-ACR: train-rle.csv (ImageId, EncodedPixels; -1 = empty) and dicom-images-train/<study>/<series>/."""
    from evaluation.readers import encode_siim_rle

    rows = []
    for index in range(12):
        positive = index % 2 == 1
        image_id = f"1.2.276.0.7230010.3.1.4.{8323329 + index}"
        pixels.write_dicom(root / "dicom-images-train" / f"1.2.{index}" / f"1.3.{index}" / f"{image_id}.dcm",
                           pixels.variant(800 + index, positive, 1024), image_id)
        mask = np.zeros((1024, 1024), dtype=bool)
        if positive:
            mask[600:840, 180:540] = True
        rows.append([image_id, encode_siim_rle(mask)])
    _csv(root / "train-rle.csv", ["ImageId", "EncodedPixels"], rows)
    return root


def build_chexpert(root: Path, pixels: Pixels) -> Path:
    """CheXpert-v1.0-small: train.csv / valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 labels) and JPGs."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14]
    for csv_name, folder, first, count in (("train.csv", "train", 1, 12), ("valid.csv", "valid", 64541, 8)):
        rows = []
        for k in range(count):
            positive = k % 2 == 1
            path = f"CheXpert-v1.0-small/{folder}/patient{first + k:05d}/study1/view1_frontal.jpg"
            pixels.write_8bit(root / path, pixels.variant(900 + first + k, positive))
            labels = ["1.0" if (n == LABEL and positive) else ("0.0" if n == LABEL else "") for n in CHEXPERT_14]
            rows.append([path, "Female", 60, "Frontal", "PA", *labels])
        _csv(root / "CheXpert-v1.0-small" / csv_name, header, rows)
    return root


def build_covidx(root: Path, pixels: Pixels) -> Path:
    """COVIDx CXR: train.txt / test.txt (`patient_id filename class source`), images in train/ and test/."""
    for split, count in (("train", 12), ("test", 9)):
        lines = []
        for k in range(count):
            label = ("negative", "positive", "pneumonia")[k % 3]
            name = f"{split}-{k:03d}.png"
            pixels.write_8bit(root / split / name, pixels.variant(1000 + 50 * (split == "test") + k, label != "negative"))
            lines.append(f"{split}{k} {name} {label} {'sirm' if k % 2 else 'rsna'}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def collections(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("collections")
    pixels, reports = Pixels(), iu_reports(160)
    found = build_mimic(base, pixels, reports)
    found["manifest"] = build_manifest(base / "hospital-export", pixels, reports)
    found["rsna"] = build_rsna(base / "rsna", pixels)
    found["siim"] = build_siim(base / "siim", pixels)
    found["chexpert"] = build_chexpert(base / "chexpert", pixels)
    found["covidx"] = build_covidx(base / "covidx", pixels)
    found["base"] = base
    return found


# ------------------------------------------------------------------------------------ doc commands
def doc_commands(page: str, module: str) -> list[str]:
    """Every `python -m <module> ...` command in a docs page's bash blocks (continuation lines joined)."""
    text = (ROOT / "docs" / page).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(f"python -m {module} "):
                commands.append(" ".join(line.split()))
    return commands


def doc_command(page: str, module: str, data: str) -> str:
    found = [c for c in doc_commands(page, module) if f"data={data} " in c + " "]
    assert found, f"docs/{page} shows no `python -m {module}` command with data={data}"
    return found[0]


def run_doc_command(command: str, paths: dict[str, str], extra: list[str], timeout: int = 600):
    """The doc's command with its placeholder paths replaced and `extra` keys added; they must not set a key the
    doc command sets (that would be another command)."""
    for placeholder, path in paths.items():
        assert placeholder in command, f"{placeholder} is not in the doc command {command!r}"
        command = command.replace(placeholder, path)
    argv = shlex.split(command)
    given = {a.split("=", 1)[0] for a in argv[3:]}
    assert not given & {e.split("=", 1)[0] for e in extra}, f"the test would change the doc's own keys: {command}"
    done = subprocess.run([sys.executable, *argv[1:], *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


MIMIC_PATHS = {"/data/physionet.org/files/mimic-cxr/2.1.0": "mimic_cxr",
               "/data/physionet.org/files/mimic-cxr-jpg/2.1.0": "mimic_cxr_jpg",
               "/data/mimic-cxr-reports.zip": "reports_zip"}
PLACEHOLDERS = {**MIMIC_PATHS, "/data/hospital-export": "manifest", "/data/rsna": "rsna", "/data/siim": "siim",
                "/data/chexpert": "chexpert", "/data/covidx": "covidx"}


def paths_in(command: str, collections: dict[str, Path], **more: str) -> dict[str, str]:
    found = {p: str(collections[key]) for p, key in PLACEHOLDERS.items() if p in command}
    return {**found, **more}


# ------------------------------------------------------------------------------- MIMIC-CXR simulation
@pytest.fixture(scope="module")
def mimic_run(collections, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("mimic_run") / "run"
    command = doc_command("simulation.md", "simulations.run", "mimic_cxr")
    done = run_doc_command(command, paths_in(command, collections), [f"hydra.run.dir={run_dir}", *SMALL_SIMULATION])
    return run_dir, done.stdout


def test_mimic_cxr_dicom_release_simulates_as_documented(mimic_run, collections):
    run_dir, stdout = mimic_run
    summary = json.loads((run_dir / "summary.json").read_text())
    # the 16 train patients dealt to the 4 sites of the doc's command; validate and test patients kept out
    assert summary["config"]["data"]["layout"] == "mimic_cxr" and len(summary["sites"]) == 4
    assert sum(site["studies"] for site in summary["sites"].values()) == 16
    assert [r["round"] for r in summary["rounds"]] == [1]
    for encoder in ("federated", "random"):
        probe = summary["final"][encoder]["linear_probe"]["1.0"]
        assert set(probe["per_label"]) == {LABEL, "No Finding"}   # the chexpert table's labels with both classes
        assert 0.0 <= probe["mean_auc"]["mean"] <= 1.0
        # validate: 8 studies; test: 8 studies, one with the real 16-bit JPEG 2000 radiograph as a second image
        assert summary["final"][encoder]["images"] == {"train": 8, "test": 9}
    # the apps composed no data section; each virtual site read its data, resolved, from its own site file
    overrides = (run_dir / "app_overrides.txt").read_text().split()
    assert not [o for o in overrides if o.lstrip("+~").startswith("data")]
    site = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "sites" / "0.yaml").read_text())))
    assert site["data"] == {"root": str(collections["mimic_cxr"]), "layout": "mimic_cxr", "split": "train",
                            "index": False}   # indexed by the run: its studies are in the catalog named beside
    assert site["catalog"] == str(collections["mimic_cxr"] / "fedcxr-catalog.sqlite")
    trained = [json.loads(line) for name in summary["sites"] if (run_dir / "sites" / name / "outgoing.jsonl").is_file()
               for line in (run_dir / "sites" / name / "outgoing.jsonl").read_text().splitlines()]
    # FedAvg (the default): each of the 4 sites trains the one round once, and none fails
    assert sorted(r["records"]["site"]["values"]["name"] for r in trained) == sorted(summary["sites"])
    assert all(r["type"] == "train" and r["error"] is None for r in trained)
    assert "| federated |" in stdout and "linear probe mean AUC @ 1.0" in (run_dir / "report.md").read_text()


def test_the_run_relinkage_audit_attacks_a_mimic_cxr_federation_as_documented(mimic_run, tmp_path):
    """docs/privacy.md's `audits=[run_relinkage]` command on the MIMIC-CXR DICOM release's federation: members are
    the 16 train studies its sites read, non-members the validate and test patients' studies of the same catalog."""
    run_dir, _ = mimic_run
    audit_dir = tmp_path / "audit"
    done = subprocess.run([sys.executable, "-m", "simulations.privacy_audit", "audits=[run_relinkage]",
                           f"run_relinkage.runs=[{run_dir}]", "relinkage.bootstrap=50", f"hydra.run.dir={audit_dir}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = json.loads((audit_dir / "audit.json").read_text())["run_relinkage"]
    assert [row["arm"] for row in rows] == ["run: untrained", "run: global model"]
    partition = json.loads((run_dir / "partition.json").read_text())
    trained = {study for site in partition.values() for study in site["studies"]}
    for row in rows:
        assert (row["members"], row["nonmembers"]) == (len(trained), 16)     # one image per study
        assert 0.0 <= row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1] <= 1.0
    assert rows[1]["accountant_epsilon"] is None                             # no DP: infinite, written as null
    assert "| run: global model | inf | 16 / 16 |" in done.stdout


def test_the_papers_gpu_command_composes_for_the_apps(collections):
    """The GPU command (ViT-B/16 + BioClinicalBERT weights, 100 rounds) cannot train here: its configuration is
    composed as the run and as the apps would compose it, and its data prepared."""
    from omegaconf import OmegaConf

    from shared_models.config import compose
    from simulations.run import app_overrides

    command = [c for c in doc_commands("simulation.md", "simulations.run") if "model=vit_b16_bert" in c]
    assert command, "docs/simulation.md lost its GPU command"
    argv = shlex.split(command[0].replace("/data/mimic-cxr", str(collections["mimic_cxr"])))[3:]
    cfg = compose(argv, config_name="simulate")
    choices = {o.split("=")[0]: o.split("=")[1] for o in argv if o.split("=")[0] in ("data", "model", "partition")}
    overrides = app_overrides(cfg, choices, forced={"federation.site_dir": "/tmp/sites"})
    apps = compose(overrides)
    assert OmegaConf.to_container(apps.model, resolve=True) == OmegaConf.to_container(cfg.model, resolve=True)
    assert apps.federation.rounds == 100 and apps.train.batch_size == 64 and apps.partition.alpha == 0.3
    assert cfg.data.root == str(collections["mimic_cxr"]) and cfg.data.layout == "mimic_cxr"


def test_every_real_collection_command_in_the_simulation_docs_is_run_here():
    """A real-collection command added to docs/simulation.md must get a test here too."""
    commands = [c for module in ("simulations.run", "simulations.centralized") for c in doc_commands("simulation.md", module)
                if re.search(r"data=(?!phantom)\w", c)]
    run_here = {doc_command("simulation.md", "simulations.run", "mimic_cxr"),        # test_mimic_cxr_dicom_release_...
                doc_command("simulation.md", "simulations.run", "manifest"),         # manifest_run (Ctrl-C, resume)
                doc_command("simulation.md", "simulations.centralized", "mimic_cxr_jpg"),
                *[c for c in commands if "model=vit_b16_bert" in c]}                 # composed only (GPU weights)
    assert commands and set(commands) <= run_here, sorted(set(commands) - run_here)


# ------------------------------------------------------------------ MIMIC-CXR-JPG centralized
def test_mimic_cxr_jpg_trains_centralized_as_documented(collections, tmp_path):
    command = doc_command("simulation.md", "simulations.centralized", "mimic_cxr_jpg")
    run_dir = tmp_path / "central"
    run_doc_command(command, paths_in(command, collections),
                    [f"hydra.run.dir={run_dir}", "train.steps=2", "train.batch_size=4", "train.threads=1"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["images"] == 16   # the train split's JPGs, reports from the zip
    assert all(np.isfinite(v) for v in summary["loss_end"].values())
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["model"]["name"] == "tiny_cnn" and meta["config"]["data"]["layout"] == "mimic_cxr_jpg"


# ------------------------------------------------------------------------------- evaluation commands
RUNNER = """
import json, runpy, sys
commands, outcomes_file, outcomes = json.loads(sys.argv[1]), sys.argv[2], []
for argv in commands:
    sys.argv = ["evaluation/run.py", *argv]
    try:
        runpy.run_module("evaluation.run", run_name="__main__")
        outcomes.append(0)
    except SystemExit as exit:
        outcomes.append(exit.code if isinstance(exit.code, int) else 1)
with open(outcomes_file, "w") as handle:
    json.dump(outcomes, handle)
"""


@pytest.fixture(scope="module")
def evaluations(mimic_run, collections, tmp_path_factory) -> dict:
    """Every real-collection command of docs/evaluation.md on the MIMIC simulation's checkpoint, plus a random
    floor without model=, in one Python process (each as `python -m evaluation.run` would run it: the module's
    main under the same argv) so that the imports are paid once."""
    run_dir, _ = mimic_run
    out = tmp_path_factory.mktemp("evaluations")
    commands = [c for c in doc_commands("evaluation.md", "evaluation.run")
                if "data.root=" in c and "data=phantom" not in c]
    runs, argvs = [], []
    for k, command in enumerate(commands):
        for placeholder, path in paths_in(command, collections, CKPT=str(run_dir / "checkpoint")).items():
            command = command.replace(placeholder, path)
        argv = shlex.split(command)[3:]
        runs.append((commands[k], out / f"run{k}"))
        argvs.append([*argv, f"hydra.run.dir={out / f'run{k}'}", *SMALL_EVALUATION])
    refused = out / "random_without_model"
    argvs.append(["checkpoint=random", "task=linear_probe", "data=covidx", f"data.root={collections['covidx']}",
                  f"hydra.run.dir={refused}", *SMALL_EVALUATION])
    contradicted = out / "model_contradicts_checkpoint"
    argvs.append([f"checkpoint={run_dir / 'checkpoint'}", "model=tiny", "task=linear_probe", "data=covidx",
                  f"data.root={collections['covidx']}", f"hydra.run.dir={contradicted}", *SMALL_EVALUATION])
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs), str(out / "outcomes.json")], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    outcomes = json.loads((out / "outcomes.json").read_text())
    return {"runs": runs, "outcomes": outcomes, "stderr": done.stderr, "refused": refused,
            "contradicted": contradicted}


def _results(evaluations, data: str, task: str) -> dict:
    for (command, folder), code in zip(evaluations["runs"], evaluations["outcomes"]):
        if f"data={data} " in command + " " and f"task={task}" in command:
            assert code == 0, f"{command} failed:\n{evaluations['stderr'][-4000:]}"
            return json.loads((folder / "results.json").read_text())
    raise AssertionError(f"docs/evaluation.md has no task={task} command for data={data}")


def test_every_real_collection_in_the_evaluation_docs_is_run_here(evaluations):
    documented = {re.search(r"data=(\w+)", c).group(1) for c, _ in evaluations["runs"]}
    assert documented == {"mimic_cxr", "mimic_cxr_jpg", "manifest", "rsna", "siim", "chexpert", "covidx"}


def test_mimic_cxr_and_jpg_evaluate_as_documented(evaluations):
    probe = _results(evaluations, "mimic_cxr", "linear_probe")
    assert probe["data"] == "mimic_cxr" and probe["images"] == {"train": 16, "test": 9}
    assert set(probe["linear_probe"]["1.0"]["per_label"]) == {LABEL, "No Finding"}
    retrieval = _results(evaluations, "mimic_cxr_jpg", "retrieval")
    assert retrieval["images"]["test"] == 8 and 0.0 <= retrieval["retrieval"]["i2t_r1"] <= retrieval["retrieval"]["i2t_r5"] <= 1.0


def test_public_benchmarks_evaluate_as_documented(evaluations):
    rsna = _results(evaluations, "rsna", "linear_probe")
    assert rsna["images"]["train"] + rsna["images"]["test"] == 12
    assert set(rsna["linear_probe"]["1.0"]["per_label"]) == {"Pneumonia"}
    siim = _results(evaluations, "siim", "segmentation")
    assert siim["images"]["train"] + siim["images"]["test"] == 12
    assert 0.0 <= siim["segmentation"]["1.0"]["dice_empty_as_one"]["mean"] <= 1.0
    chexpert = _results(evaluations, "chexpert", "linear_probe")
    assert chexpert["images"] == {"train": 12, "test": 8}
    assert set(chexpert["linear_probe"]["1.0"]["per_label"]) == {LABEL}
    covidx = _results(evaluations, "covidx", "linear_probe")
    assert covidx["images"] == {"train": 12, "test": 9}


def test_manifest_probes_its_own_label_column(evaluations):
    """Depends on H6's manifest label columns (probe.labels=[covid])."""
    probe = _results(evaluations, "manifest", "linear_probe")
    assert set(probe["linear_probe"]["1.0"]["per_label"]) == {"covid"}
    # the hospital without notes is kept for image-only evaluation: train 6 + 6 + 4 images, test 3 + 3 + 2
    assert probe["images"] == {"train": 16, "test": 8}


def test_manifest_segments_only_the_masked_images(evaluations):
    """Depends on H6's masks: a blank mask_path is no mask (left out), an empty mask file is an empty mask."""
    seg = _results(evaluations, "manifest", "segmentation")
    masked = {"train": 0, "test": 0}
    # rows with index % 3 == 2 have no mask; among each split's rows count those with one
    index = 0
    for count in MANIFEST_SITES.values():
        for k in range(count):
            split = "train" if k < count // 2 else ("validate" if k < 3 * count // 4 else "test")
            if index % 3 != 2 and split in ("train", "test"):
                masked[split] += 1
            index += 1
    assert seg["images"] == masked


def test_random_needs_a_model_and_a_checkpoint_refuses_another(evaluations):
    *_, random_code, contradicted_code = evaluations["outcomes"]
    assert random_code != 0 and not (evaluations["refused"] / "results.json").exists()
    assert "checkpoint=random needs model=NAME" in evaluations["stderr"]
    assert contradicted_code != 0 and not (evaluations["contradicted"] / "results.json").exists()
    assert "holds model 'tiny_cnn_half' (its meta.json), not model=tiny" in evaluations["stderr"]   # make simulate's model


# ------------------------------------------------------------------------- the benchmarks pre-train not
@pytest.mark.parametrize("name", ["chexpert", "rsna", "siim", "covidx"])
def test_benchmarks_are_refused_for_pre_training_with_the_reason(name, tmp_path):
    from shared_models.config import compose
    from simulations.data import prepare_data

    cfg = compose([f"data={name}", f"data.root={tmp_path}"], config_name="simulate")
    with pytest.raises(ValueError, match=rf"data.benchmark={name} is a public benchmark without reports.*"
                                         r"python -m evaluation.run"):
        prepare_data(cfg.data)


# ------------------------------------------------------------- manifest simulation: Ctrl-C, then resume
def _alive(pid: int) -> bool:
    from simulations.flower import _alive as alive

    return alive(pid)


@pytest.fixture(scope="module")
def manifest_run(collections, tmp_path_factory) -> dict:
    """The manifest command with 3 rounds, Ctrl-C (SIGINT to its process group, as a terminal sends it) once
    round 1 is checkpointed, then the resume command it printed."""
    from simulations.flower import descendants

    run_dir = tmp_path_factory.mktemp("manifest_run") / "run"
    command = doc_command("simulation.md", "simulations.run", "manifest")
    for placeholder, path in paths_in(command, collections).items():
        command = command.replace(placeholder, path)
    small = [o for o in SMALL_SIMULATION if not o.startswith("federation.rounds=")]
    argv = [sys.executable, *shlex.split(command)[1:], f"hydra.run.dir={run_dir}", "federation.rounds=3", *small]
    out, err = open(run_dir.parent / "stdout.txt", "w+"), open(run_dir.parent / "stderr.txt", "w+")
    process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while not (run_dir / "checkpoints" / "round_0001" / "meta.json").is_file():
            assert process.poll() is None, f"the run ended before round 1: {Path(err.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "round 1 was not checkpointed in time"
            time.sleep(0.5)
        below = descendants(process.pid)
        sent = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
        stop_s = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    time.sleep(0.5)
    out.close(), err.close()
    stopped = {"code": code, "stop_s": stop_s, "below": below, "survivors": [p for p in below if _alive(p)],
               "stderr": Path(err.name).read_text(), "stdout": Path(out.name).read_text()}
    resume = re.search(r"resume with: (.+)", stopped["stderr"])
    assert resume, stopped["stderr"][-3000:]
    resume_argv = shlex.split(resume.group(1))
    assert resume_argv[:3] == ["python", "-m", "simulations.run"]
    done = subprocess.run([sys.executable, *resume_argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    return {"run_dir": run_dir, "stopped": stopped, "resumed": done, "resume_argv": resume_argv}


def test_ctrl_c_stops_the_simulation_within_5_s_and_leaves_no_process(manifest_run):
    stopped = manifest_run["stopped"]
    assert stopped["code"] == 128 + signal.SIGINT
    assert len(stopped["below"]) >= 3   # SuperLink, SuperExec, the simulation process and Ray's were running
    assert stopped["stop_s"] < 5.0 + 2.0, stopped["stop_s"]   # 5 s, with slack for a loaded 2-core machine
    assert not stopped["survivors"], f"{len(stopped['survivors'])} of {len(stopped['below'])} processes outlived Ctrl-C"
    run_dir = str(manifest_run["run_dir"])
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert run_dir not in text, text


def test_ctrl_c_names_the_checkpointed_rounds_and_a_resume_command_that_completes(manifest_run):
    stopped, done = manifest_run["stopped"], manifest_run["resumed"]
    assert re.search(r"stopped by SIGINT: rounds 1(, 2)? of 3 are checkpointed in .*checkpoints", stopped["stderr"])
    assert manifest_run["resume_argv"][-2:] == [f"hydra.run.dir={manifest_run['run_dir']}", "federation.resume=true"]
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    summary = json.loads((manifest_run["run_dir"] / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["config"]["data"]["layout"] == "manifest"
    assert {"hospital_a", "hospital_b"} <= set(summary["sites"])   # partition=natural: the manifest's site column
    assert summary["final"]["federated"]["linear_probe"]["1.0"]["mean_auc"]["mean"] >= 0.0


def test_a_hospital_without_notes_is_named_not_silently_dropped(manifest_run):
    """Depends on H6's empty-report handling: the partition lists every site of the data and warns about one left
    with no study to pre-train on."""
    assert "hospital_c" in (manifest_run["run_dir"] / "sites.md").read_text()
    warnings = [line for line in (manifest_run["stopped"]["stdout"] + manifest_run["stopped"]["stderr"]).splitlines()
                if "hospital_c" in line and "images/hospital_c" not in line]
    assert warnings, "no warning names the hospital whose studies have no report"
