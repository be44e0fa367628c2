"""Evaluation: metrics on hand-computed cases, patient sampling, benchmark readers, probes and the report."""
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import metrics, readers
from evaluation.linear_probe import ProbeSettings, run_linear_probe
from evaluation.report import check_results, plot_dice_histogram, plot_overlays, plot_roc_curves, write_results
from evaluation.retrieval import evaluate_retrieval
from evaluation.sampling import sample_fraction, split_by_patient
from evaluation.segmentation import SegmentationSettings, dice_bce_loss, run_segmentation, train_decoder
from evaluation.zero_shot import DEFAULT_PROMPTS, Prompts, evaluate_zero_shot, load_prompts, zero_shot_scores
from shared_models.vocab import CHEXPERT_LABELS


# ----------------------------------------------------------------------------------------- metrics
def test_auc_hand_computed():
    # Positive 0.35 beats one of two negatives, positive 0.8 beats both: 3 of 4 pairs.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A positive tied with a negative counts one half: (0.5 + 1 + 2) / 4.
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert metrics.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert metrics.roc_auc([0, 1, 1], [0.9, 0.1, 0.2]) == pytest.approx(0.0)
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.roc_auc([0, 1, math.nan], [0.1, 0.2, 0.3])


def test_auc_matches_sklearn_with_many_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300) + 0.8 * y   # few distinct scores: many ties
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


def test_per_label_auc_masks_missing_and_reports_skipped():
    labels = np.array([[1, 1], [0, 1], [np.nan, 1], [1, np.nan]])
    scores = np.array([[0.9, 0.1], [0.2, 0.2], [0.0, 0.3], [0.1, 0.4]])
    aucs, skipped = metrics.per_label_auc(labels, scores, ["a", "b"])
    # Label a: rows 0, 1, 3 -> positives 0.9, 0.1 vs negative 0.2: one of two pairs won.
    assert aucs == {"a": pytest.approx(0.5)}
    assert "b" in skipped and "one class" in skipped["b"]


def test_f1_and_accuracy_at_threshold():
    y, s = [1, 1, 0, 0, 1], [0.9, 0.4, 0.6, 0.1, 0.5]
    # Predicted positive: 0.9, 0.6, 0.5 -> tp 2, fp 1, fn 1 -> F1 = 4 / 6.
    assert metrics.f1_at(y, s) == pytest.approx(4 / 6)
    assert metrics.accuracy_at(y, s) == pytest.approx(3 / 5)
    assert metrics.multiclass_accuracy([0, 2, 1], [[1, 0, 0], [0, 1, 2], [3, 1, 0]]) == pytest.approx(2 / 3)


def _dice_case():
    pred = np.zeros((4, 4, 4), bool)
    truth = np.zeros((4, 4, 4), bool)
    truth[0, 0, :4] = True            # 4 truth pixels; prediction hits 2 and adds 2 elsewhere: 2*2 / 8
    pred[0, 0, :2] = True
    pred[0, 3, :2] = True
    # image 1: both empty; image 2: empty truth, one predicted pixel; image 3: truth missed entirely.
    pred[2, 1, 1] = True
    truth[3, 2, 2:4] = True
    return pred, truth


def test_dice_both_empty_conventions():
    pred, truth = _dice_case()
    as_one = metrics.dice_per_image(pred, truth, "empty_as_one")
    excluded = metrics.dice_per_image(pred, truth, "empty_excluded")
    np.testing.assert_allclose(as_one, [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(excluded, [0.5, np.nan, np.nan, 0.0])
    summary = metrics.dice_summary(pred, truth)
    assert summary["dice_empty_as_one"] == pytest.approx(0.375)
    assert summary["dice_empty_excluded"] == pytest.approx(0.25)
    assert summary["images_with_empty_truth"] == 2
    with pytest.raises(ValueError, match="unknown Dice convention"):
        metrics.dice_per_image(pred, truth, "empty_as_zero")


def test_recall_at_k_hand_made_similarity():
    sim = np.array([[0.9, 0.1, 0.2],
                    [0.8, 0.3, 0.1],      # correct (0.3) is second
                    [0.1, 0.2, 0.05]])    # correct (0.05) is third
    assert metrics.recall_at_k(sim, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # Report -> image ranks the columns: correct items ranked first, first, third.
    assert metrics.recall_at_k(sim.T, ks=(1, 2)) == pytest.approx({1: 2 / 3, 2: 2 / 3})
    recalls = metrics.image_text_recalls(sim)
    assert recalls["i2t_r1"] == pytest.approx(1 / 3) and recalls["t2i_r5"] == 1.0
    # Ties count against the correct item: a constant similarity gets no credit at K=1.
    assert metrics.recall_at_k(np.ones((4, 4)), ks=(1,))[1] == 0.0


def test_retrieval_from_embeddings():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(20, 8))
    result = evaluate_retrieval(images, images * 3.0)      # same directions: every pair ranks first
    assert result["i2t_r1"] == 1.0 and result["t2i_r1"] == 1.0 and result["pairs"] == 20
    shuffled = evaluate_retrieval(images, images[::-1])
    assert shuffled["i2t_r1"] < 0.2


# ---------------------------------------------------------------------------------------- sampling
PATIENTS = [f"p{i // 3 if i < 30 else i}" for i in range(60)]   # 10 patients with 3 studies, 30 with one


def test_label_fraction_samples_whole_patients_reproducibly():
    rows = sample_fraction(PATIENTS, 0.25, seed=0)
    chosen = {PATIENTS[i] for i in rows}
    assert len(chosen) == 10                                             # 25 % of 40 patients
    assert set(rows) == {i for i, p in enumerate(PATIENTS) if p in chosen}  # all studies of each
    assert np.array_equal(rows, sample_fraction(PATIENTS, 0.25, seed=0))
    assert any(not np.array_equal(rows, sample_fraction(PATIENTS, 0.25, seed=s)) for s in (1, 2))
    assert set(sample_fraction(PATIENTS, 0.1, seed=0)) <= set(rows)      # nested per seed
    assert len({PATIENTS[i] for i in sample_fraction(PATIENTS, 0.001, seed=3)}) == 1
    with pytest.raises(ValueError, match="label fraction"):
        sample_fraction(PATIENTS, 0.0, seed=0)


def test_split_by_patient_is_disjoint_and_complete():
    splits = split_by_patient(PATIENTS, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=5)
    patients = {name: {PATIENTS[i] for i in rows} for name, rows in splits.items()}
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    assert not patients["train"] & patients["val"]
    assert sorted(np.concatenate(list(splits.values()))) == list(range(len(PATIENTS)))
    assert [len(patients[n]) for n in ("train", "val", "test")] == [28, 4, 8]


# ----------------------------------------------------------------------------------------- readers
def test_siim_rle_decodes_column_major_relative_code():
    # 3 rows x 4 cols. Column-major pixel numbers of the ones: 2, 3, 4 | 6 | 9 | 11.
    mask = np.array([[0, 1, 1, 1],
                     [0, 1, 0, 0],
                     [1, 0, 0, 1]], dtype=bool)
    relative, absolute = "2 3 1 1 2 1 1 1", "3 3 7 1 10 1 12 1"
    np.testing.assert_array_equal(readers.decode_siim_rle(relative, (3, 4)), mask)
    np.testing.assert_array_equal(readers.decode_siim_rle(absolute, (3, 4), "absolute"), mask)
    assert readers.encode_siim_rle(mask) == relative
    assert readers.encode_siim_rle(mask, "absolute") == absolute
    assert not readers.decode_siim_rle("-1", (3, 4)).any()
    with pytest.raises(ValueError, match="outside"):
        readers.decode_siim_rle("10 5", (3, 4))


def test_siim_reader_unions_rows_and_finds_nested_images(tmp_path):
    nested = tmp_path / "dicom-images-train" / "1.2.3" / "1.2.3.4"
    nested.mkdir(parents=True)
    for name in ("img.a", "img.b"):
        (nested / f"{name}.dcm").write_bytes(b"")
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        "img.a, 2 3 1 1 2 1 1 1\n"
        "img.a, 10 1\n"                 # second region of the same image: pixel (row 1, col 3)
        "img.b, -1\n")
    records = readers.read_siim(tmp_path / "train-rle.csv", tmp_path / "dicom-images-train", image_shape=(3, 4))
    by_id = {r.image_id: r for r in records}
    expected = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(by_id["img.a"].mask.array(), expected)
    assert by_id["img.a"].labels == {"Pneumothorax": 1.0} and by_id["img.b"].labels == {"Pneumothorax": 0.0}
    assert not by_id["img.b"].mask.array().any()
    assert by_id["img.a"].image_path == nested / "img.a.dcm"


def test_rsna_reader_boxes_become_mask(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        "img-a,10,20,30,40,1\n"
        "img-a,100,100,10,5,1\n"
        "img-b,,,,,0\n")
    records = readers.read_rsna(tmp_path / "stage_2_train_labels.csv", tmp_path, image_shape=(256, 256),
                                check_files=False)
    by_id = {r.image_id: r for r in records}
    mask = by_id["img-a"].mask.array()
    assert mask.sum() == 30 * 40 + 10 * 5                       # non-overlapping boxes
    assert mask[20, 10] and mask[59, 39] and not mask[60, 10]   # y rows, x columns
    assert by_id["img-a"].labels == {"Pneumonia": 1.0}
    assert not by_id["img-b"].mask.array().any() and by_id["img-b"].labels == {"Pneumonia": 0.0}
    assert by_id["img-a"].image_path == tmp_path / "img-a.dcm"
    (tmp_path / "bad.csv").write_text("patientId,x,y,width,height,Target\nimg-c,,,,,1\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        readers.read_rsna(tmp_path / "bad.csv", tmp_path, check_files=False)
    with pytest.raises(FileNotFoundError, match="images are missing"):
        readers.read_rsna(tmp_path / "stage_2_train_labels.csv", tmp_path)


CHEXPERT_CSV = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices\n"
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n"
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Male,87,Frontal,PA,,,1.0,,,-1.0,,,0.0,,,,,\n"
    "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Male,87,Lateral,,,,1.0,,,-1.0,,,0.0,,,,,\n")


@pytest.mark.parametrize("policy, edema", [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_chexpert_reader_uncertain_policies(tmp_path, policy, edema):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    (folder / "train.csv").write_text(CHEXPERT_CSV)
    records = readers.read_chexpert(folder / "train.csv", uncertain=policy, check_files=False)
    assert [r.patient_id for r in records] == ["patient00001", "patient00002", "patient00002"]
    assert records[1].study_id == "patient00002/study2"
    assert records[1].image_path == tmp_path / "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"
    second = records[1].labels
    assert second["Cardiomegaly"] == 1.0 and second["Atelectasis"] == 0.0
    assert (math.isnan(second["Edema"]) if math.isnan(edema) else second["Edema"] == edema)
    assert math.isnan(second["Pneumonia"])                       # blank stays missing
    assert records[0].labels["No Finding"] == 1.0 and records[0].labels["Pneumothorax"] == 0.0
    assert records[0].meta["Sex"] == "Female"
    matrix = readers.labels_matrix(records, CHEXPERT_LABELS)
    assert matrix.shape == (3, 14) and matrix[0, CHEXPERT_LABELS.index("Support Devices")] == 1.0
    frontal = readers.read_chexpert(folder / "train.csv", uncertain=policy, frontal_only=True, check_files=False)
    assert len(frontal) == 2
    with pytest.raises(ValueError, match="uncertain-label policy"):
        readers.read_chexpert(folder / "train.csv", uncertain="maybe", check_files=False)


def test_covidx_reader_lines_and_classes(tmp_path):
    (tmp_path / "train.txt").write_text(
        "3 ARDSSevere.png positive cohen\n"
        "3 other.png negative rsna\n"
        "\n"
        "7 img7.jpg negative cohen\n")
    records = readers.read_covidx(tmp_path / "train.txt", tmp_path / "train", check_files=False)
    assert [r.patient_id for r in records] == ["cohen/3", "rsna/3", "cohen/7"]
    assert records[0].image_path == tmp_path / "train" / "ARDSSevere.png"
    targets, classes = readers.class_targets(records)
    assert classes == ["negative", "positive"] and targets.tolist() == [1, 0, 0]
    (tmp_path / "bad.txt").write_text("3 a.png\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        readers.read_covidx(tmp_path / "bad.txt", tmp_path, check_files=False)


def _write_gz(path, text):
    with gzip.open(path, "wt") as handle:
        handle.write(text)


def test_mimic_reader_official_test_split(tmp_path):
    """Evaluation reads MIMIC-CXR as a site does (client.data.layouts, then the catalog): the official test split,
    frontal views only, the study's CheXpert labels with uncertain mapped by the evaluation's policy."""
    from client.data.layouts import DEFAULT_VIEWS, open_layout, view_allowed

    (tmp_path / "files").mkdir()
    blank = "," * 13
    _write_gz(tmp_path / "mimic-cxr-2.0.0-split.csv.gz",
              "dicom_id,study_id,subject_id,split\nd1,50000001,10000001,test\nd2,50000001,10000001,test\n"
              "d3,50000002,10000002,train\n")
    _write_gz(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz",
              "dicom_id,subject_id,study_id,ViewPosition\nd1,10000001,50000001,PA\nd2,10000001,50000001,LATERAL\n"
              "d3,10000002,50000002,AP\n")
    header = "subject_id,study_id," + ",".join(CHEXPERT_LABELS)
    row = "10000001,50000001,-1.0" + blank   # Atelectasis uncertain, the rest blank
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(f"{header}\n{row}\n")
    studies = open_layout("mimic_cxr", tmp_path).studies()
    records = [(study, image) for study in studies if study.split == "test" for image in study.images
               if view_allowed(image.view, DEFAULT_VIEWS)]
    assert [image.image_id for _, image in records] == ["d1"]      # the lateral view is filtered out
    study, image = records[0]
    assert tmp_path / image.path == tmp_path / "files/p10/p10000001/s50000001/d1.dcm"
    labels = dict(zip(CHEXPERT_LABELS, study.labels))
    assert readers.uncertain_value(labels["Atelectasis"], "zeros") == 0.0 and labels["Edema"] is None


def test_phantom_reader_masks_per_target(tmp_path):
    (tmp_path / "masks").mkdir()
    left = np.zeros((8, 6), np.uint8)
    left[1:3, 1:3] = 255
    right = np.zeros((8, 6), np.uint8)
    right[5:7, 4:6] = 255
    Image.fromarray(left).save(tmp_path / "masks" / "a_ptx.png")
    Image.fromarray(right).save(tmp_path / "masks" / "a_eff.png")
    truth = {"seed": 0, "studies": {
        "50000001": {"subject_id": "10000001", "split": "test", "dicom_ids": ["a"], "labels": {"Pneumothorax": 1.0},
                     "findings": [{"finding": "pneumothorax", "region": "right_apex", "masks": {"a": "masks/a_ptx.png"}},
                                  {"finding": "pleural_effusion", "region": None, "masks": {"a": "masks/a_eff.png"}}]},
        "50000002": {"subject_id": "10000002", "split": "test", "dicom_ids": ["b"], "labels": {"Pneumothorax": 0.0},
                     "findings": []},
        "50000003": {"subject_id": "10000003", "split": "train", "dicom_ids": ["c"], "labels": {}, "findings": []}}}
    (tmp_path / "ground_truth.json").write_text(json.dumps(truth))
    ptx = {r.image_id: r for r in readers.read_phantom(tmp_path, "test", "pneumothorax", check_files=False)}
    assert set(ptx) == {"a", "b"}
    assert ptx["a"].mask.array().sum() == 4 and ptx["a"].labels == {"Pneumothorax": 1.0}
    assert ptx["a"].image_path == tmp_path / "files/p10/p10000001/s50000001/a.dcm"
    assert not ptx["b"].mask.array(shape=(8, 6)).any()
    union = readers.read_phantom(tmp_path, "test", "any", check_files=False)[0].mask.array()
    assert union.sum() == 8
    with pytest.raises(ValueError, match="mask target"):
        readers.read_phantom(tmp_path, "test", "pneumothoraxx", check_files=False)


def test_manifest_reader_labels_and_masks(tmp_path):
    """A manifest evaluates as a site reads it (client.data.layouts): label columns by name, and the mask_path
    column as evaluation.data reads it (a file, EMPTY for an empty mask, blank for none)."""
    from client.data.layouts import open_layout
    from evaluation.data import manifest_mask

    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "m1.png")
    (tmp_path / "manifest.csv").write_text(
        "image_path,patient_id,split,Pneumothorax,mask_path,report\nimg1.png,p1,test,1.0,m1.png,r\n"
        "img2.png,p2,test,0.0,EMPTY,r\nimg3.png,p3,test,0.0,,r\n")
    studies = open_layout("manifest", tmp_path).studies()
    assert [study.labels for study in studies] == [{"Pneumothorax": 1.0}, {"Pneumothorax": 0.0}, {"Pneumothorax": 0.0}]
    masks = [manifest_mask(tmp_path, study.images[0].mask_path) for study in studies]
    assert masks[0].array().sum() == 16 and not masks[1].array(shape=(4, 4)).any()
    assert masks[2] is None   # blank: no mask, not an empty one


# ---------------------------------------------------------------------------------- linear probe
def _synthetic(n, dims, rng, separable):
    x = rng.normal(size=(n, dims)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32) if separable else rng.integers(0, 2, (n, 3)).astype(np.float32)
    y[rng.random((n, 3)) < 0.1] = np.nan       # missing labels are masked, not used as negatives
    return x, y


@pytest.mark.parametrize("separable, low, high", [(True, 0.97, 1.0), (False, 0.38, 0.62)])
def test_linear_probe_separable_and_noise(separable, low, high):
    rng = np.random.default_rng(0)
    x_train, y_train = _synthetic(400, 16, rng, separable)
    x_test, y_test = _synthetic(400, 16, rng, separable)
    patients = [f"p{i // 2}" for i in range(400)]
    results, scores = run_linear_probe(x_train, y_train, patients, x_test, y_test, ["a", "b", "c"],
                                       fractions=[0.1, 1.0], seeds=[0, 1], settings=ProbeSettings())
    assert set(results) == {"0.1", "1.0"}
    full = results["1.0"]
    assert low <= full["mean_auc"]["mean"] <= high
    assert len(full["mean_auc"]["per_seed"]) == 2 and full["train_images"] == [400, 400]
    assert results["0.1"]["train_images"] == [40, 40]
    assert set(full["per_label"]) == {"a", "b", "c"} and scores["1.0"].shape == (400, 3)


def test_linear_probe_multiclass_accuracy():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 8))
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 8))
    results, _ = run_linear_probe(x[:200], y[:200], [str(i) for i in range(200)], x[200:], y[200:],
                                  ["a", "b", "c"], fractions=[1.0], seeds=[0], multiclass=True)
    assert results["1.0"]["accuracy"]["mean"] > 0.95 and results["1.0"]["mean_auc"]["mean"] > 0.98


# ------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_scores_follow_prompt_similarity():
    prompts = {"A": Prompts(("a yes",), ("a no",)), "B": Prompts(("b yes", "b sure"), ("b no",))}
    axes = {"a yes": 0, "a no": 1, "b yes": 2, "b sure": 2, "b no": 3}

    def encode_text(texts):
        return np.eye(4, dtype=np.float32)[[axes[t] for t in texts]]

    labels = np.array([[1, 0], [0, 1], [1, 1], [0, np.nan]], dtype=np.float32)
    images = np.stack([np.eye(4)[0 if a else 1] + np.eye(4)[2 if b == 1 else 3] for a, b in labels])
    scores = zero_shot_scores(images, encode_text, prompts, ["A", "B"])
    known = ~np.isnan(labels)
    assert np.array_equal(scores[known] > 0.5, labels[known] == 1)
    result = evaluate_zero_shot(scores, labels, ["A", "B"])
    assert result["mean_auc"] == 1.0 and result["f1"] == 1.0 and result["accuracy"] == 1.0
    flipped = evaluate_zero_shot(1 - scores, labels, ["A", "B"])
    assert flipped["mean_auc"] == 0.0 and flipped["accuracy"] == 0.0
    with pytest.raises(KeyError, match="no zero-shot prompts"):
        zero_shot_scores(images, encode_text, prompts, ["A", "C"])


def test_default_prompts_cover_chexpert_labels():
    prompts, temperature = load_prompts(DEFAULT_PROMPTS)
    assert set(CHEXPERT_LABELS) <= set(prompts) and temperature > 0
    assert all(p.positive and p.negative for p in prompts.values())


# ---------------------------------------------------------------------------------- segmentation
def test_dice_bce_loss_hand_computed():
    logits = torch.zeros(1, 1, 2, 2)                 # probability 0.5 everywhere
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # Soft Dice = (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5; BCE = ln 2 at p = 0.5.
    assert dice_bce_loss(logits, target).item() == pytest.approx(0.5 + math.log(2), rel=1e-5)


class _Pyramid(torch.nn.Module):
    """A stand-in encoder: one conv at full and at half resolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, images):
        full = self.conv(images)
        return [full, torch.nn.functional.avg_pool2d(full, 2)]


def _squares(n, rng):
    images = torch.zeros(n, 1, 16, 16)
    masks = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        if i % 4:   # a quarter of the images have empty masks
            y, x, s = rng.integers(0, 10), rng.integers(0, 10), rng.integers(3, 7)
            masks[i, 0, y:y + s, x:x + s] = 1
    images += masks * 0.8 + torch.as_tensor(rng.normal(scale=0.05, size=images.shape), dtype=torch.float32)
    return images, masks


def test_segmentation_decoder_learns_bright_squares_and_reports_both_conventions():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train_images, train_masks = _squares(32, rng)
    test_images, test_masks = _squares(16, rng)
    encoder = _Pyramid()
    settings = SegmentationSettings(epochs=25, batch_size=8, lr=5e-3, width=8)
    results, details = run_segmentation(encoder, [4, 4], train_images, train_masks, [str(i) for i in range(32)],
                                        test_images, test_masks, fractions=[1.0], seeds=[0], settings=settings)
    entry = results["1.0"]
    assert entry["dice_empty_excluded"]["mean"] > 0.8
    assert entry["dice_empty_as_one"]["mean"] > 0.8
    assert len(details["1.0"]["dice"]["empty_excluded"]) == 16
    assert np.isnan(details["1.0"]["dice"]["empty_excluded"]).sum() == 4   # the empty-truth images


def test_segmentation_fine_tune_leaves_the_given_encoder_untouched():
    rng = np.random.default_rng(0)
    images, masks = _squares(8, rng)
    encoder = _Pyramid()
    before = encoder.conv.weight.detach().clone()
    settings = SegmentationSettings(epochs=2, batch_size=4, width=4, fine_tune=True, encoder_lr=1e-2)
    _, tuned = train_decoder(encoder, [4, 4], images, masks, settings)
    assert torch.equal(encoder.conv.weight, before)
    assert not torch.equal(tuned.conv.weight, before)
    with pytest.raises(TypeError, match="nn.Module"):
        train_decoder(lambda x: [x], [1], images, masks, settings)


# ---------------------------------------------------------------------------------------- report
def test_report_writes_contract_keys_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _synthetic(60, 8, rng, separable=True)
    probe, scores = run_linear_probe(x, y, [str(i) for i in range(60)], x, y, ["a", "b", "c"], [0.5], [0, 1])
    pred, truth = _dice_case()
    results = {
        "checkpoint": "random", "data": "phantom", "linear_probe": probe,
        "zero_shot": evaluate_zero_shot(scores["0.5"], y, ["a", "b", "c"]),
        "segmentation": {"0.1": {"dice_empty_as_one": metrics.spread([0.4, 0.5]),
                                 "dice_empty_excluded": metrics.spread([0.2, math.nan])}},
        "retrieval": metrics.image_text_recalls(rng.normal(size=(12, 12))),
    }
    json_path, md_path = write_results(tmp_path, results)
    saved = json.loads(json_path.read_text())
    assert set(saved) >= {"checkpoint", "data", "linear_probe", "zero_shot", "segmentation", "retrieval"}
    assert set(saved["linear_probe"]["0.5"]["mean_auc"]) == {"mean", "std", "per_seed"}
    assert set(saved["linear_probe"]["0.5"]["per_label"]["a"]) == {"mean", "std"}
    assert set(saved["zero_shot"]) >= {"mean_auc", "f1", "accuracy", "per_label"}
    assert saved["segmentation"]["0.1"]["dice_empty_excluded"] == {"mean": 0.2, "std": 0.0, "per_seed": [0.2, None]}
    assert set(saved["retrieval"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert "| 0.5 |" in md_path.read_text()
    del results["retrieval"]["t2i_r10"]
    with pytest.raises(ValueError, match="t2i_r10"):
        check_results(results)
    for path in (plot_roc_curves(tmp_path / "roc.png", y, scores["0.5"], ["a", "b", "c"]),
                 plot_dice_histogram(tmp_path / "dice.png", {c: metrics.dice_per_image(pred, truth, c)
                                                              for c in metrics.DICE_CONVENTIONS}),
                 plot_overlays(tmp_path / "overlays.png", truth.astype(float), truth, pred.astype(float))):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ data layer glue
def test_masks_follow_the_image_pipeline():
    """A mask moved by mask_on_model_grid lands where the image pipeline puts the same pixels."""
    from client.data.cache import to_cache_image
    from client.data.transforms import EvalTransform
    from evaluation.data import mask_on_model_grid

    pixels = np.zeros((300, 200), np.float32)
    pixels[40:280, 20:190] = np.linspace(0.2, 0.4, 170)[None, :]   # body with a dark border to crop away
    mask = np.zeros_like(pixels, dtype=bool)
    mask[100:160, 120:170] = True
    pixels[mask] = 1.0
    cached, crop = to_cache_image(pixels, short_side=64)
    assert crop != (0, 0, 200, 300)                                # the border was cropped
    image, _ = EvalTransform(32)(torch.from_numpy(cached / 255.0).float()[None], torch.zeros(0, 4))
    moved = mask_on_model_grid(mask, crop, cached.shape, 32)
    bright = image[0].numpy() > 0.7
    iou = (bright & moved).sum() / (bright | moved).sum()
    assert moved.shape == (32, 32) and iou > 0.85


# ------------------------------------------------------------------------- checkpoint end to end
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved `tiny` checkpoint and a 16-study phantom at 128 px, shared by the end-to-end tests."""
    from hydra import compose, initialize_config_dir

    from evaluation.run import PROJECT_ROOT, load_model
    from shared_models.checkpoint import save_checkpoint
    from simulations.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("evaluation")
    phantom = generate_phantom(folder / "phantom", studies=16, seed=0, size=128)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base=None):
        cfg = compose("evaluate", overrides=[
            "checkpoint=random", f"data.root={phantom}", "task=all", "seeds=1", "label_fraction=[1.0]",
            "eval_split.test=validate", "segmentation.epochs=2", "segmentation.overlays=2", "probe.max_iter=20"])
    model, _, _ = load_model(cfg)
    checkpoint = save_checkpoint(folder / "checkpoint", model, cfg, step=0)
    return cfg, checkpoint, folder


def test_checkpoint_evaluates_end_to_end_on_a_tiny_phantom(tiny_setup):
    from omegaconf import OmegaConf

    from evaluation.run import evaluate

    cfg, checkpoint, folder = tiny_setup
    cfg = OmegaConf.merge(cfg, {"checkpoint": str(checkpoint)})
    results = evaluate(cfg, folder / "run", data_name="phantom")
    saved = json.loads((folder / "run" / "results.json").read_text())
    assert saved["checkpoint"] == str(checkpoint) and saved["data"] == "phantom"
    assert set(saved) >= {"linear_probe", "zero_shot", "segmentation", "retrieval"}
    assert set(saved["segmentation"]["1.0"]["dice_empty_as_one"]) >= {"mean", "std"}
    assert 0.0 <= results["retrieval"]["i2t_r10"] <= 1.0
    for plot in ("roc_zero_shot.png", "dice_1.0.png", "overlays_1.0.png"):
        assert (folder / "run" / plot).read_bytes()[:4] == b"\x89PNG"


def test_broken_checkpoint_gives_a_clear_error(tiny_setup):
    import shutil

    from omegaconf import OmegaConf

    from evaluation.run import load_model
    from shared_models.checkpoint import CheckpointError

    cfg, checkpoint, folder = tiny_setup
    broken = folder / "broken"
    shutil.copytree(checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(OmegaConf.merge(cfg, {"checkpoint": str(broken)}))
    (broken / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(OmegaConf.merge(cfg, {"checkpoint": str(broken)}))


# ------------------------------------------------------------------- public benchmarks in their own files
def _rsna_folder(root: Path) -> Path:
    """12 RSNA-style DICOMs (64 x 64): the 6 positives have a bright box at its CSV coordinates; one listed
    image is a zero-byte file."""
    from helpers.data import write_dicom

    lines = ["patientId,x,y,width,height,Target"]
    for i in range(12):
        pixels = np.random.default_rng(i).integers(900, 1100, (64, 64)).astype(np.uint16)
        if i % 2:
            pixels[16:40, 8:32] = 4000
            lines.append(f"p{i},8,16,24,24,1")
        else:
            lines.append(f"p{i},,,,,0")
        write_dicom(root / "stage_2_train_images" / f"p{i}.dcm", pixels)
    (root / "stage_2_train_images" / "p0.dcm").write_bytes(b"")
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _benchmark_cfg(tiny_setup, data: dict, task: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(tiny_setup[0], {"task": task})
    cfg.data = OmegaConf.create(data)
    return cfg


def test_rsna_files_load_with_box_masks_and_a_bad_file_left_out(tmp_path, tiny_setup):
    from evaluation.benchmarks import load_benchmark

    root = _rsna_folder(tmp_path)
    cfg = _benchmark_cfg(tiny_setup, {"benchmark": "rsna", "root": str(root), "labels": "stage_2_train_labels.csv",
                                      "images": "stage_2_train_images", "test_fraction": 0.3, "split_seed": 0,
                                      "max_pixels": 40_000_000}, "segmentation")
    train, test = load_benchmark(cfg.data, 32, "ones", masks=True)
    assert len(train) + len(test) == 11 and set(train.patient_ids).isdisjoint(test.patient_ids)
    assert list(train.meta["rejected"]) + list(test.meta["rejected"]) == ["p0"]
    pneumonia = CHEXPERT_LABELS.index("Pneumonia")
    for split in (train, test):
        for row, image_id in enumerate(split.image_ids):
            positive = int(image_id[1:]) % 2 == 1
            assert split.labels[row, pneumonia] == float(positive)
            # the 24 x 24 box of a 64 x 64 image covers 14 % of it, on the model's 32 x 32 grid too
            assert split.masks[row].mean() == pytest.approx(0.1406 if positive else 0.0, abs=0.02)
            if positive:  # the mask sits where the image is bright
                assert split.images[row, 0][split.masks[row]].mean() > split.images[row, 0][~split.masks[row]].mean()


def test_rsna_files_evaluate_end_to_end_and_refuse_retrieval(tmp_path, tiny_setup):
    from evaluation.run import evaluate

    root = _rsna_folder(tmp_path)
    data = {"benchmark": "rsna", "root": str(root), "labels": "stage_2_train_labels.csv",
            "images": "stage_2_train_images", "test_fraction": 0.3, "split_seed": 0, "max_pixels": 40_000_000}
    before = torch.get_num_threads()
    torch.set_num_threads(3)   # the evaluation runs on `threads: 1` and must hand the caller its own count back
    try:
        results = evaluate(_benchmark_cfg(tiny_setup, data, "segmentation"), tmp_path / "run", data_name="rsna")
        assert torch.get_num_threads() == 3
        assert results["data"] == "rsna" and results["images"]["train"] + results["images"]["test"] == 11
        assert 0.0 <= results["segmentation"]["1.0"]["dice_empty_excluded"]["mean"] <= 1.0
        with pytest.raises(ValueError, match="retrieval needs reports"):
            evaluate(_benchmark_cfg(tiny_setup, data, "all"), tmp_path / "run_all")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_covidx_files_probe_as_multiclass(tmp_path, tiny_setup):
    from evaluation.run import evaluate

    classes = {"normal": 40, "pneumonia": 120, "COVID-19": 220}   # grey level per class: easily separable
    for split, count in (("train", 8), ("test", 4)):
        lines = []
        for name, level in classes.items():
            for i in range(count):
                filename = f"{split}_{name}_{i}.png"
                rng = np.random.default_rng(i)
                pixels = np.clip(level + rng.normal(0, 8, (48, 48)), 0, 255).astype(np.uint8)
                (tmp_path / split).mkdir(exist_ok=True)
                Image.fromarray(pixels).save(tmp_path / split / filename)
                lines.append(f"{split}{name}{i} {filename} {name} synthetic")
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    data = {"benchmark": "covidx", "root": str(tmp_path), "train_split": "train.txt", "train_images": "train",
            "test_split": "test.txt", "test_images": "test", "max_pixels": 40_000_000}
    results = evaluate(_benchmark_cfg(tiny_setup, data, "linear_probe"), tmp_path / "run", data_name="covidx")
    probe = results["linear_probe"]["1.0"]
    assert set(probe["per_label"]) == set(classes)
    assert probe["accuracy"]["mean"] > 0.8   # grey level alone tells the classes apart


# ------------------------------------------------------- a hospital's own manifest: labels, masks, no reports
@pytest.fixture(scope="module")
def messy_manifest(tiny_setup):
    """The tiny phantom's DICOMs re-listed as a hospital export (no ground_truth.json): its own `covid`
    label (blank for some), a constant `smoker` column, a multi-class `pattern`, masks for every third image,
    EMPTY for the next, blank for the rest, and no report for every study of site `east` and two others."""
    import shutil

    import pydicom
    from PIL import Image as PILImage

    cfg, _, folder = tiny_setup
    phantom = Path(cfg.data.root)
    truth = json.loads((phantom / "ground_truth.json").read_text())["studies"]
    root = folder / "hospital"
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    patients = sorted({str(s["subject_id"]) for s in truth.values()})
    header = ["image_path", "report", "patient_id", "study_id", "split", "site", "covid", "smoker", "pattern",
              "ventilated", "mask_path"]
    rows, images, seen = [], [], {}
    for number, (study_id, study) in enumerate(sorted(truth.items())):
        p = patients.index(str(study["subject_id"]))
        split = "test" if p % 4 == 0 else "train"
        site = "east" if p % 4 == 1 else ("north" if p % 2 else "south")
        subject = str(study["subject_id"])
        report = (phantom / f"files/p{subject[:2]}/p{subject}/s{study_id}.txt").read_text()
        if site == "east" or number in (3, 4):
            report = ""
        seen[split] = seen.get(split, 0) + 1   # both classes in each split, whatever the phantom drew
        covid = "" if number % 5 == 4 else str(seen[split] % 2)
        for dicom in study["dicom_ids"]:
            k = len(images)
            shutil.copy(phantom / f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom}.dcm", root / "img")
            shape = pydicom.dcmread(root / "img" / f"{dicom}.dcm", stop_before_pixels=True)
            mask_path = ""
            if k % 3 == 0:
                mask = np.zeros((shape.Rows, shape.Columns), np.uint8)
                mask[shape.Rows // 4: shape.Rows // 2, shape.Columns // 4: shape.Columns // 2] = 255
                PILImage.fromarray(mask).save(root / "masks" / f"{dicom}.png")
                mask_path = f"masks/{dicom}.png"
            elif k % 3 == 1:
                mask_path = "EMPTY"
            images.append({"image": dicom, "study": study_id, "split": split, "site": site, "report": bool(report),
                           "covid": covid, "mask": mask_path})
            rows.append([f"img/{dicom}.dcm", report, subject, study_id, split, site, covid, "1",
                         ["normal", "abnormal", "unclear"][number % 3], ["No", "yes", ""][seen[split] % 3], mask_path])
    import csv
    with open(root / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return root, images


def _manifest_cfg(tiny_setup, root: Path, **changes):
    from omegaconf import OmegaConf

    from evaluation.run import PROJECT_ROOT

    cfg = OmegaConf.merge(tiny_setup[0], {"eval_split": {"train": "train", "test": "test"}}, changes)
    cfg.data = OmegaConf.merge(OmegaConf.load(PROJECT_ROOT / "configs/data/manifest.yaml"), {"root": str(root)})
    return cfg


def test_manifest_probe_on_its_own_label_column_counts_images_without_reports(messy_manifest, tiny_setup, tmp_path):
    from evaluation.run import evaluate, probe_label_names

    root, images = messy_manifest
    train = [i for i in images if i["split"] == "train"]
    known = [i for i in train if i["covid"]]
    assert {i["covid"] for i in known} == {"0", "1"} and any(not i["report"] for i in known)
    results = evaluate(_manifest_cfg(tiny_setup, root, probe={"labels": ["covid"]}, task="linear_probe"), tmp_path / "a")
    probe = results["linear_probe"]["1.0"]
    assert list(probe["per_label"]) == ["covid"] and 0.0 <= probe["per_label"]["covid"]["mean"] <= 1.0
    assert probe["train_images"] == [len(known)]   # blanks are unknown: left out of the column's loss
    # image-only evaluation keeps the images whose study has no report
    assert results["images"] == {"train": len(train), "test": len(images) - len(train)}
    # the data config's `labels:` list names the probe's labels when probe.labels does not
    by_data = _manifest_cfg(tiny_setup, root)
    by_data.data.labels = ["covid", "smoker"]
    assert probe_label_names(by_data) == ["covid", "smoker"]
    by_data.probe.labels = ["pattern"]
    assert probe_label_names(by_data) == ["pattern"]


def test_manifest_probe_refuses_unusable_labels_naming_column_and_counts(messy_manifest, tiny_setup):
    from evaluation.data import load_split, prepare_catalog
    from evaluation.linear_probe import probe_targets

    root, images = messy_manifest
    catalog, cache = prepare_catalog(_manifest_cfg(tiny_setup, root).data)
    train, test = (load_split(catalog, cache, split, 32, "ones") for split in ("train", "test"))
    n_train = sum(i["split"] == "train" for i in images)
    with pytest.raises(ValueError, match=r"probe label 'smoker' \(train: %d positive, 0 negative, 0 unknown; "
                                         r"test: \d+ positive, 0 negative, 0 unknown\): the train split has one class"
                                         % n_train):
        probe_targets(train, test, ["smoker"], "ones")
    with pytest.raises(ValueError, match=r"probe label 'Pneumothorax': no image .* label columns here: covid, "
                                         r"pattern, smoker, ventilated"):
        probe_targets(train, test, ["Pneumothorax"], "ones")
    with pytest.raises(ValueError, match=r"probe a multi-class column alone: probe.labels=\[pattern\]"):
        probe_targets(train, test, ["covid", "pattern"], "ones")
    with pytest.raises(ValueError, match=r"no label has both classes in both splits: 'covid' \(train: \d+ positive"):
        positives = [k for k, v in enumerate(test.label_values) if v["covid"] != 0.0 and v["ventilated"] != "No"]
        probe_targets(train, test.rows(np.array(positives)), None, "ones")
    multiclass = probe_targets(train, test, ["pattern"], "ones")
    assert multiclass.multiclass and multiclass.names == ["abnormal", "normal", "unclear"]
    assert [multiclass.names[c] for c in multiclass.train_y] == [train.label_values[k]["pattern"]
                                                                 for k in multiclass.train_rows]
    words = probe_targets(train, test, ["ventilated"], "ones")   # yes / no is binary; blank unknown
    assert not words.multiclass and set(np.unique(words.train_y)) == {0.0, 1.0}
    covid = probe_targets(train, test, None, "ones")   # no request: every binary label usable in both splits
    assert covid.names == ["covid", "ventilated"] and len(covid.train_rows) == sum(
        v["covid"] is not None or v["ventilated"] is not None for v in train.label_values)


def test_blank_mask_path_is_no_mask_and_empty_marker_an_empty_mask(messy_manifest, tiny_setup, tmp_path):
    from evaluation.data import attach_masks, load_split, prepare_catalog
    from evaluation.run import evaluate

    root, images = messy_manifest
    cfg = _manifest_cfg(tiny_setup, root, task="segmentation")
    catalog, cache = prepare_catalog(cfg.data)
    train = attach_masks(load_split(catalog, cache, "train", 128, "ones"), cfg.data, catalog, "any")
    listed = {i["image"]: i["mask"] for i in images}
    rows = {image_id.split("/")[-1]: k for k, image_id in enumerate(train.image_ids)}
    for image, k in rows.items():
        assert train.has_mask[k] == bool(listed[image])
        if listed[image] == "EMPTY":
            assert not train.masks[k].any()
        elif listed[image]:
            assert 0.03 < train.masks[k].mean() < 0.4   # the drawn square, through crop and resize
    with_masks = train.with_masks()
    assert len(with_masks) == sum(1 for i in images if i["split"] == "train" and i["mask"]) < len(train)
    results = evaluate(cfg, tmp_path / "seg")
    assert results["segmentation"]["1.0"]["train_images"] == [len(with_masks)]
    assert results["images"] == {split: sum(1 for i in images if i["split"] == split and i["mask"])
                                 for split in ("train", "test")}


def test_studies_without_report_leave_pretraining_not_evaluation_and_their_site_is_named(
        messy_manifest, tiny_setup, caplog):
    import logging

    from omegaconf import OmegaConf

    from client.data.catalog import open_catalog, usable_studies
    from client.data.dataset import CxrDataset
    from evaluation.data import prepare_catalog
    from simulations.partition import composition, composition_markdown, partition

    root, images = messy_manifest
    catalog, cache = prepare_catalog(_manifest_cfg(tiny_setup, root).data)
    train = [i for i in images if i["split"] == "train"]
    pretraining = CxrDataset(catalog, cache, split="train", image_size=64)
    assert sorted(e.image_id.split("/")[-1] for e in pretraining.images) == sorted(i["image"] for i in train if i["report"])
    everything = CxrDataset(catalog, cache, split="train", image_size=64, require_report=False)
    assert len(everything) == len(train) and sum(not s["has_report"] for s in everything) == \
        sum(not i["report"] for i in train)
    db = open_catalog(catalog, readonly=True)
    studies = usable_studies(db, "train", require_report=False)
    db.close()
    with caplog.at_level(logging.WARNING, logger="simulations.partition"):
        sites = partition(studies, 3, OmegaConf.create({"name": "natural"}), seed=0)
    assert [s.name for s in sites] == ["north", "south"]   # east has nothing to pre-train on
    assert "east" in caplog.text and "no study with a usable report" in caplog.text
    table = composition(sites, studies)
    east_studies = {i["study"] for i in train if i["site"] == "east"}
    assert table["east"]["studies"] == 0 and table["east"]["without_report"] == len(east_studies)
    assert sum(row["studies"] for row in table.values()) == len({i["study"] for i in train if i["report"]})
    assert table["north"]["without_report"] == len({i["study"] for i in train if i["site"] == "north" and not i["report"]})
    assert "| east | 0 | 0 |" in composition_markdown(table)


def test_manifest_mask_path_blank_empty_file_and_outside(tmp_path):
    from evaluation.data import manifest_mask

    (tmp_path / "data").mkdir()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "data" / "m.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "outside.png")
    assert manifest_mask(tmp_path / "data", "") is None and manifest_mask(tmp_path / "data", None) is None
    assert not manifest_mask(tmp_path / "data", " empty ").array(shape=(4, 4)).any()
    assert manifest_mask(tmp_path / "data", "m.png").array().all()
    with pytest.raises(ValueError, match="outside the data folder"):
        manifest_mask(tmp_path / "data", "../outside.png")


@pytest.mark.timeout(60)
def test_a_mask_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    import os

    from evaluation.data import manifest_mask

    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file|regular"):
        manifest_mask(tmp_path / "data", "pipe.png").array()
