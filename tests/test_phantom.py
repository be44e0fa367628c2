"""The synthetic phantom (layout, ids, DICOM variety, masks, reports, labels) and the scanner transform."""
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from client.data.images import read_image
from client.data.scanner import ScannerProfile, apply_scanner, scanner_profile
from shared_models.vocab import CHEXPERT_LABELS, OBSERVATIONS, REGIONS, ZONE_ATLAS
from helpers.data import read_gz_csv
from simulations.phantom import generate_phantom

SIZE = 128


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom") / "p", studies=50, seed=7, size=SIZE)


def truth_of(root: Path) -> dict:
    return json.loads((root / "ground_truth.json").read_text())


def decode(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    """The DICOM as training sees it (client.data.images: air dark, [0, 1]) and its header."""
    return read_image(path).pixels, pydicom.dcmread(path, stop_before_pixels=True)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def body_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the pixels clearly brighter than air (the corners)."""
    air = np.median(np.concatenate([pixels[:4, :4].ravel(), pixels[-4:, -4:].ravel()]))
    ys, xs = np.nonzero(pixels > air + 0.3 * (np.median(pixels) - air))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    first = file_hashes(generate_phantom(tmp_path / "a", studies=6, seed=3, size=96))
    second = file_hashes(generate_phantom(tmp_path / "b", studies=6, seed=3, size=96))
    other = file_hashes(generate_phantom(tmp_path / "c", studies=6, seed=4, size=96))
    assert first == second
    assert len(first) > 6 * 4
    assert first["ground_truth.json"] != other["ground_truth.json"]
    assert set(first) != set(other)          # different ids, so different paths


def test_worker_processes_write_the_same_bytes(tmp_path):
    serial = file_hashes(generate_phantom(tmp_path / "serial", studies=40, seed=3, size=96))
    assert file_hashes(generate_phantom(tmp_path / "two", studies=40, seed=3, size=96, workers=2)) == serial


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        generate_phantom(tmp_path, studies=2, seed=0, size=96)
    assert (tmp_path / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------------------ layout and ids
def test_tables_have_mimic_columns_and_consistent_ids(phantom):
    columns, records = read_gz_csv(phantom / "cxr-record-list.csv.gz")
    assert columns == ["subject_id", "study_id", "dicom_id", "path"]
    assert read_gz_csv(phantom / "cxr-study-list.csv.gz")[0] == ["subject_id", "study_id", "path"]
    meta_columns, metadata = read_gz_csv(phantom / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert meta_columns[:9] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"]
    split_columns, splits = read_gz_csv(phantom / "mimic-cxr-2.0.0-split.csv.gz")
    assert split_columns == ["dicom_id", "study_id", "subject_id", "split"]
    chexpert_columns, chexpert = read_gz_csv(phantom / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert chexpert_columns == ["subject_id", "study_id", *CHEXPERT_LABELS]

    images = {(r["subject_id"], r["study_id"], r["dicom_id"]) for r in records}
    assert images == {(r["subject_id"], r["study_id"], r["dicom_id"]) for r in metadata}
    assert images == {(r["subject_id"], r["study_id"], r["dicom_id"]) for r in splits}
    studies = {(s, st) for s, st, _ in images}
    assert len(studies) == 50 == len(chexpert) == len({(r["subject_id"], r["study_id"]) for r in chexpert})
    for subject, study, dicom in images:
        assert re.fullmatch(r"1\d{7}", subject) and re.fullmatch(r"5\d{7}", study)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", dicom)
    for row in records:
        subject, study = row["subject_id"], row["study_id"]
        assert row["path"] == f"files/p{subject[:2]}/p{subject}/s{study}/{row['dicom_id']}.dcm"
        assert (phantom / row["path"]).is_file() and (phantom / row["path"]).with_suffix(".jpg").is_file()
    for row in read_gz_csv(phantom / "cxr-study-list.csv.gz")[1]:
        assert (phantom / row["path"]).is_file() and row["path"].endswith(f"s{row['study_id']}.txt")

    studies_per_patient = defaultdict(set)
    split_of_patient = defaultdict(set)
    for row in splits:
        studies_per_patient[row["subject_id"]].add(row["study_id"])
        split_of_patient[row["subject_id"]].add(row["split"])
    assert max(len(s) for s in studies_per_patient.values()) == 2           # follow-up studies exist
    assert all(len(s) == 1 for s in split_of_patient.values())               # split is per patient
    assert {r["split"] for r in splits} == {"train", "validate", "test"}
    views = [r["ViewPosition"] for r in metadata]
    assert {"PA", "AP", "LATERAL"} <= set(views)
    frontal_per_study = defaultdict(int)
    for r in metadata:
        frontal_per_study[r["study_id"]] += r["ViewPosition"] in ("PA", "AP")
    assert set(frontal_per_study.values()) == {1}


def test_reports_have_mimic_sections_and_varied_wording(phantom):
    reports = [p.read_text() for p in sorted((phantom / "files").rglob("s*.txt"))]
    assert len(reports) == 50
    for text in reports:
        for header in ("EXAMINATION:", "INDICATION:", "COMPARISON:"):
            assert header in text
        assert "FINDINGS:" in text or "IMPRESSION:" in text
        assert max(len(line) for line in text.splitlines()) <= 80    # hard wraps
    assert any("FINDINGS:" not in t for t in reports) and any("IMPRESSION:" not in t for t in reports)
    joined = " ".join(" ".join(t.split()) for t in reports).lower()
    assert "___" in joined
    for phrase in ("no pneumothorax", "no focal consolidation", "heart size is normal"):
        assert phrase in joined or phrase.replace("no ", "there is no ") in joined
    assert re.search(r"may (represent|reflect)|cannot be excluded|cannot exclude|possible", joined)


def test_chexpert_csv_follows_ground_truth(phantom):
    truth = truth_of(phantom)["studies"]
    _, chexpert = read_gz_csv(phantom / "mimic-cxr-2.0.0-chexpert.csv.gz")
    seen = defaultdict(int)
    for row in chexpert:
        labels = truth[row["study_id"]]["labels"]
        assert set(labels) == set(CHEXPERT_LABELS)
        for name in CHEXPERT_LABELS:
            value = row[name]
            seen[value] += 1
            if name == "No Finding":
                assert value == ("1.0" if labels[name] == 1.0 else "")
            elif labels[name] == 1.0:
                assert value in ("1.0", "-1.0"), (row["study_id"], name)      # a present finding is always reported
            else:
                assert value in ("0.0", ""), (row["study_id"], name)          # absent: negated or unmentioned
    assert seen["1.0"] and seen["-1.0"] and seen["0.0"] and seen[""]
    positives = np.array([[truth[r["study_id"]]["labels"][n] for n in CHEXPERT_LABELS] for r in chexpert])
    assert 0.2 < positives[:, CHEXPERT_LABELS.index("No Finding")].mean() < 0.6


# ------------------------------------------------------------------------------------ DICOM variety
def test_dicoms_decode_with_mixed_syntaxes_and_photometrics(phantom):
    _, metadata = read_gz_csv(phantom / "mimic-cxr-2.0.0-metadata.csv.gz")
    syntaxes, photometrics, inverse = set(), set(), 0
    for row in metadata:
        path = phantom / f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}/{row['dicom_id']}.dcm"
        pixels, ds = decode(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        photometrics.add(ds.PhotometricInterpretation)
        inverse += ds.get("PresentationLUTShape") == "INVERSE"
        assert (ds.Rows, ds.Columns) == (int(row["Rows"]), int(row["Columns"])) == pixels.shape
        assert ds.BitsStored == 12 and ds.PatientID == row["subject_id"] and ds.StudyID == row["study_id"]
        assert ds.ViewPosition == row["ViewPosition"] and float(ds.PixelSpacing[0]) > 0
        corners = np.concatenate([pixels[:3, :3].ravel(), pixels[-3:, -3:].ravel()]).mean()
        centre = pixels[pixels.shape[0] // 4: 3 * pixels.shape[0] // 4, pixels.shape[1] // 4: 3 * pixels.shape[1] // 4]
        assert corners < centre.mean() - 0.15, f"{path.name} ({ds.PhotometricInterpretation}) is not air-dark"
        stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
        assert stored.max() < 4096
        stored_air_is_bright = stored[:3, :3].mean() > stored[pixels.shape[0] // 2, pixels.shape[1] // 2]
        assert stored_air_is_bright == (ds.PhotometricInterpretation == "MONOCHROME1")     # MONOCHROME1 stores inverted
        twin = np.asarray(Image.open(path.with_suffix(".jpg")), dtype=np.float64)
        assert twin.shape == pixels.shape and np.corrcoef(twin.ravel(), pixels.ravel())[0, 1] > 0.97
    assert len(syntaxes) >= 3 and pydicom.uid.ExplicitVRLittleEndian in syntaxes
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"} and inverse > 0


# ------------------------------------------------------------------------------------ masks and places
def frontal_path(root: Path, study_id: str, study: dict) -> Path:
    subject = study["subject_id"]
    return root / f"files/p{subject[:2]}/p{subject}/s{study_id}/{study['dicom_ids'][0]}.dcm"


def test_masks_are_nonempty_inside_the_body_and_in_their_region(phantom):
    truth = truth_of(phantom)
    assert truth["seed"] == 7
    checked = 0
    for study_id, study in truth["studies"].items():
        pixels, _ = decode(frontal_path(phantom, study_id, study))
        x1, y1, x2, y2 = body_box(pixels)
        air = np.median(pixels[:4, :4])
        for finding in study["findings"]:
            assert finding["finding"] in OBSERVATIONS and finding["region"] in (*REGIONS, None)
            assert list(finding["masks"]) == [study["dicom_ids"][0]]
            mask = np.asarray(Image.open(phantom / finding["masks"][study["dicom_ids"][0]]))
            assert mask.shape == pixels.shape and set(np.unique(mask)) == {0, 255}
            inside = mask > 0
            assert (pixels[inside] > air + 0.05).mean() > 0.98          # on the body, not in the air
            cy, cx = (np.argwhere(inside).mean(0) - (y1, x1)) / (y2 - y1, x2 - x1)
            region = finding["region"]
            if region and region.endswith("_zone"):
                bx1, by1, bx2, by2 = ZONE_ATLAS[region]
                assert bx1 - 0.1 < cx < bx2 + 0.1 and by1 - 0.1 < cy < by2 + 0.1, (finding, cx, cy)
            if region in ("right_costophrenic_angle", "right_apex", "right_lung"):
                assert cx < 0.5                                              # patient's right = image left
            if region in ("left_costophrenic_angle", "left_apex", "left_lung"):
                assert cx > 0.5
            checked += 1
    assert checked >= 20


def test_findings_are_not_at_a_fixed_place(phantom):
    centroids = defaultdict(list)
    for study in truth_of(phantom)["studies"].values():
        for finding in study["findings"]:
            mask = np.asarray(Image.open(phantom / finding["masks"][study["dicom_ids"][0]])) > 0
            centroids[(finding["finding"], finding["region"])].append(np.argwhere(mask).mean(0))
            centroids[finding["finding"]].append(np.argwhere(mask).mean(0))
    # lines and tubes follow anatomy (trachea, SVC) by design; every pathology must move
    repeated = {k: np.array(v) for k, v in centroids.items()
                if isinstance(k, tuple) and len(v) >= 2 and k[0] != "support_device"}
    assert repeated, "expected some finding to repeat in the same region"
    for key, points in repeated.items():        # same finding, same region: still a different place
        assert points.std(0).max() > 0.01 * SIZE, key
    for name in ("pleural_effusion", "cardiomegaly"):
        assert len(centroids[name]) >= 3 and np.array(centroids[name]).std(0).max() > 0.01 * SIZE


def test_cardiomegaly_means_a_wide_heart(phantom):
    ratios = {True: [], False: []}
    for study_id, study in truth_of(phantom)["studies"].items():
        for finding in study["findings"]:
            if finding["finding"] == "cardiomegaly":
                pixels, _ = decode(frontal_path(phantom, study_id, study))
                x1, _, x2, _ = body_box(pixels)
                heart = np.asarray(Image.open(phantom / finding["masks"][study["dicom_ids"][0]])) > 0
                columns = np.nonzero(heart.any(0))[0]
                ratios[True].append((columns.max() - columns.min() + 1) / (x2 - x1))
    assert ratios[True] and min(ratios[True]) > 0.42        # heart wider than half of the lung span (0.84)


# ------------------------------------------------------------------------------------ scanner
def test_scanner_profiles_are_deterministic_and_differ_across_sites():
    assert scanner_profile(0) == ScannerProfile()
    assert scanner_profile(3, seed=1) == scanner_profile(3, seed=1)
    profiles = [scanner_profile(i) for i in range(1, 6)]
    assert len(set(profiles)) == 5
    for a, b in zip(profiles, profiles[1:]):
        assert abs(np.log(a.gamma) - np.log(b.gamma)) > 0.25   # neighbouring sites lie on opposite sides of 1
    with pytest.raises(ValueError):
        scanner_profile(-1)


def test_apply_scanner_keeps_type_shape_and_range_and_is_seeded_by_key():
    rng = np.random.default_rng(0)
    image = rng.random((40, 48)).astype(np.float32)
    profile = ScannerProfile(contrast=1.3, gamma=0.7, noise_std=0.05, blur_sigma=1.0, border=0.05)
    out = apply_scanner(image, profile, "img-1")
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, apply_scanner(image, profile, "img-1"))
    assert not np.array_equal(out, apply_scanner(image, profile, "img-2"))
    assert np.all(out[:2] == 0) and np.all(out[:, :2] == 0) and out[10:30, 10:38].mean() > 0.1   # dark frame only

    tensor = torch.from_numpy(image)[None]
    out_tensor = apply_scanner(tensor, profile, "img-1")
    assert isinstance(out_tensor, torch.Tensor) and out_tensor.shape == (1, 40, 48)
    np.testing.assert_allclose(out_tensor[0].numpy(), out, atol=1e-6)

    np.testing.assert_allclose(apply_scanner(image, ScannerProfile(), "x"), image, atol=1e-6)   # identity
    smooth = apply_scanner(image, ScannerProfile(blur_sigma=1.5), "x")
    assert smooth.std() < 0.6 * image.std()                       # blur removes pixel noise
    assert abs(smooth.mean() - image.mean()) < 0.01               # ...without shifting brightness
    gamma = apply_scanner(np.full((8, 8), 0.25, np.float32), ScannerProfile(gamma=0.5), "x")
    np.testing.assert_allclose(gamma, 0.5, atol=1e-6)             # 0.25 ** 0.5


def test_sites_render_the_same_image_differently():
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    outputs = [apply_scanner(image, scanner_profile(i), "same-image") for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(outputs[i] - outputs[j]).mean() > 0.02, (i, j)


@pytest.mark.parametrize("held_out", [0.1, 0.3])
def test_held_out_share_sets_the_test_and_validate_patients(held_out):
    from collections import Counter

    from simulations.phantom import plan_studies

    plans = plan_studies(400, seed=0, held_out=held_out)
    split_of = {p.subject_id: p.split for p in plans}
    assert len(split_of) == len({(p.subject_id, p.split) for p in plans})   # a patient is in one split only
    patients = Counter(split_of.values())
    expected = round(held_out * len(split_of))
    assert patients["test"] == patients["validate"] == expected
    assert patients["train"] == len(split_of) - 2 * expected


def test_held_out_share_is_checked(tmp_path):
    from simulations.phantom import generate_phantom

    with pytest.raises(ValueError, match="held-out"):
        generate_phantom(tmp_path / "p", 10, held_out=0.5)


# ------------------------------------------------------------------------------------ finding contrast
def _render(plan, contrast: float):
    from simulations.phantom import render_study

    return render_study(np.random.default_rng([5, 1, plan.index]), plan, 128, finding_contrast=contrast)


def test_finding_contrast_strengthens_findings_and_changes_nothing_else():
    import copy

    from simulations.phantom import plan_studies

    plans = plan_studies(40, seed=5)
    lesion_plans = [p for p in plans if any(f.finding in ("consolidation", "mass", "pleural_effusion")
                                            for f in p.findings)][:4]
    normal_plans = [p for p in plans if not p.findings][:2]
    assert lesion_plans and normal_plans
    for plan in lesion_plans:
        (image1, *_), masks1, spacing1 = _render(copy.deepcopy(plan), 1.0)
        (image3, *_), masks3, spacing3 = _render(copy.deepcopy(plan), 3.0)
        assert spacing1 == spacing3
        for f, mask1, mask3 in zip(plan.findings, masks1, masks3):
            assert np.array_equal(mask1, mask3), f.finding        # the ground truth does not move
            if f.finding not in ("consolidation", "mass", "pleural_effusion") or mask1.sum() < 20:
                continue
            brightening = (image3[mask1] - image1[mask1]).mean()
            elsewhere = np.abs(image3 - image1)[~np.logical_or.reduce(masks1)].mean()
            assert brightening > 0.04 and brightening > 4 * elsewhere, (f.finding, brightening, elsewhere)
    for plan in normal_plans:                                    # no finding: the same pixels
        (image1, *_), _, _ = _render(plan, 1.0)
        (image3, *_), _, _ = _render(plan, 3.0)
        assert np.array_equal(image1, image3)


def test_finding_contrast_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="finding-contrast"):
        generate_phantom(tmp_path / "bad", 4, finding_contrast=0.0)
    root = generate_phantom(tmp_path / "p", 4, seed=1, size=96, finding_contrast=2.0)
    assert truth_of(root)["finding_contrast"] == 2.0
