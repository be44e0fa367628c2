"""Cache, transforms and the torch Dataset: crop and resize, boxes that follow the geometry, no flips,
sample shapes, and a 50-study phantom that round-trips through index and dataset."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from client.data.cache import ImageCache, crop_to_content, to_cache_image
from client.data.catalog import Image, Study, open_catalog, usable_studies
from client.data.dataset import CxrDataset
from client.data.index import index_data
from client.data.layouts import open_layout
from client.data.transforms import EvalTransform, TrainTransform, crop_matrix, transform_boxes, warp
from helpers.data import make_mimic, read_gz_csv, study_spec, write_csv
from shared_models.vocab import CHEXPERT_LABELS, OBSERVATIONS, REGIONS, ZONE_ATLAS


# --- cache ----------------------------------------------------------------------------------------

def bordered_image():
    """300 x 200 texture with a black top/left border, a white right and a grey bottom border."""
    image = np.zeros((300, 200), np.float32)
    image[20:280, 15:185] = np.random.default_rng(0).uniform(0.2, 0.9, (260, 170))
    image[:, 185:] = 1.0
    image[280:, 15:185] = 0.5
    return image


def test_crop_removes_known_border_and_resizes_to_short_side():
    image = bordered_image()
    assert crop_to_content(image) == (15, 20, 185, 280)
    cached, box = to_cache_image(image, 256)
    assert box == (15, 20, 185, 280)
    assert cached.dtype == np.uint8 and cached.shape == (round(260 * 256 / 170), 256)
    # Same content: the mean grey level survives the resize (no border pixels mixed in).
    assert abs(cached.mean() / 255 - image[20:280, 15:185].mean()) < 0.01
    # A uniform image has no content to crop to: it is kept whole, not cut to nothing.
    assert crop_to_content(np.full((50, 40), 0.5, np.float32)) == (0, 0, 40, 50)


def test_cache_shards_round_trip_through_memmap(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 20), (25, 40), (50, 10)]]
    with ImageCache(tmp_path, shard_bytes=1500) as cache:
        entries = [cache.append(image) for image in images]
    # 600 + 1000 > 1500 bytes starts a new shard; 1000 + 500 still fits in it.
    assert [(e.shard, e.offset) for e in entries] == [(0, 0), (1, 0), (1, 1000)]
    reader = pickle.loads(pickle.dumps(ImageCache(tmp_path)))
    for image, entry in zip(images, entries):
        stored = reader.read(entry.shard, entry.offset, entry.height, entry.width)
        assert isinstance(stored.base, np.memmap) or isinstance(stored, np.memmap)
        np.testing.assert_array_equal(stored, image)
    with ImageCache(tmp_path, shard_bytes=1500) as cache:    # a second writer appends after the last one
        entry = cache.append(images[0])
    assert (entry.shard, entry.offset) == (2, 0)
    assert sorted(p.name for p in tmp_path.glob("shard_*.u8")) == [f"shard_0000{i}.u8" for i in range(3)]


# --- transforms -------------------------------------------------------------------------------

def square_image(size=64, box=(40, 8, 56, 24)):
    image = torch.zeros(1, size, size)
    x1, y1, x2, y2 = box
    image[0, y1:y2, x1:x2] = 1.0
    return image, torch.tensor([[x1 / size, y1 / size, x2 / size, y2 / size]])


def bright_bbox(image, threshold=0.5):
    ys, xs = torch.nonzero(image[0] > threshold, as_tuple=True)
    size = image.shape[-1]
    return torch.tensor([xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size])


def test_boxes_follow_a_known_crop():
    image, boxes = square_image()
    out, moved = warp(image, boxes, crop_matrix(0.5, 0.0, 0.5, 1.0), 64)   # the right half, stretched
    torch.testing.assert_close(moved[0], torch.tensor([0.25, 0.125, 0.75, 0.375]))
    torch.testing.assert_close(bright_bbox(out), moved[0], atol=1.5 / 64, rtol=0)


def test_boxes_follow_a_known_rotation():
    image, boxes = square_image(box=(24, 24, 40, 40))
    angle = math.radians(30)
    rotate = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0],
                           [0, 0, 1]], dtype=torch.float64)
    centre = torch.tensor([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=torch.float64)
    matrix = centre @ rotate @ torch.linalg.inv(centre)
    out, moved = warp(image, boxes, matrix, 64)
    half = 8 * (math.cos(angle) + math.sin(angle)) / 64    # half-width of a rotated 16-px square's bounds
    torch.testing.assert_close(moved[0], torch.tensor([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(bright_bbox(out, 0.3), moved[0], atol=2 / 64, rtol=0)


def test_random_train_transform_moves_boxes_with_the_image():
    transform = TrainTransform(64)
    generator = torch.Generator().manual_seed(0)
    image, boxes = square_image(box=(20, 12, 36, 28))
    for _ in range(20):
        out, moved = transform(image, boxes, generator)
        assert out.shape == (1, 64, 64) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        # Bright is > 0.5 before jitter; the default jitter keeps contrast >= 0.9 and shifts <= 0.05 around the mean.
        torch.testing.assert_close(bright_bbox(out, 0.45), moved[0], atol=3 / 64, rtol=0)


def test_never_a_horizontal_flip():
    image = torch.zeros(1, 80, 64)
    image[0, :, :24] = 0.9               # bright patient's right (image left)
    image[0, 10:30, 40:60] = 0.5         # a smaller mark on the other side
    transform = TrainTransform(48)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        out, _ = transform(image, torch.zeros(0, 4), generator)
        assert out[0, :, :16].mean() > out[0, :, 32:].mean() + 0.2


def test_eval_transform_is_resize_and_centre_crop():
    image = torch.rand(1, 80, 64)
    boxes = torch.tensor([[0.0, 0.1, 1.0, 0.9], [0.25, 0.5, 0.75, 0.6]])
    out, moved = EvalTransform(32)(image, boxes)
    assert out.shape == (1, 32, 32)
    # Rows 8..72 of 80 are kept: y' = (y * 80 - 8) / 64.
    torch.testing.assert_close(moved, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 0.625]]))
    expected = torch.nn.functional.interpolate(image[None], size=(40, 32), mode="bilinear",
                                               antialias=True, align_corners=False)[0, :, 4:36]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert transform_boxes(torch.zeros(0, 4), torch.eye(3, dtype=torch.float64)).shape == (0, 4)


# --- dataset ----------------------------------------------------------------------------------

@pytest.fixture
def indexed(tmp_path):
    specs = study_spec(3)
    root = make_mimic(tmp_path / "mimic", specs)
    index_data(open_layout("mimic_cxr", root), tmp_path / "catalog.sqlite", tmp_path / "cache")
    return specs, tmp_path / "catalog.sqlite", tmp_path / "cache"


def test_dataset_samples_have_the_contract_shapes(indexed):
    specs, catalog, cache = indexed
    dataset = CxrDataset(catalog, cache, image_size=32)
    assert len(dataset) == 3                                      # the laterals are filtered out
    sample = dataset[0]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1.0
    assert (sample["patient_id"], sample["study_id"], sample["image_id"]) == \
        (specs[0]["patient"], specs[0]["study"], specs[0]["images"][0][0])
    assert sample["tags"].shape == (len(OBSERVATIONS),) and sample["tags"].dtype == torch.float32
    expected = torch.tensor([float(v) if v else math.nan for v in specs[0]["labels"]])
    torch.testing.assert_close(sample["labels"], expected, equal_nan=True)
    assert sample["boxes"].shape == (len(REGIONS), 4)
    assert sample["report"].startswith(sample["findings"]) and sample["report"].endswith(sample["impression"])
    assert len(sample["sentences"]) == len(sample["sentence_regions"]) > 0
    # Eval boxes: the atlas moved by the centre crop of the cached image.
    height, width = dataset.images[0].cache[2:]
    atlas = torch.tensor([ZONE_ATLAS[r] for r in REGIONS])
    expected_boxes = atlas.clone()
    if height > width:
        expected_boxes[:, [1, 3]] = ((atlas[:, [1, 3]] * height - (height - width) / 2) / width).clamp(0, 1)
    torch.testing.assert_close(sample["boxes"], expected_boxes, atol=1e-5, rtol=0)


def test_dataset_filters_and_site_transform(indexed):
    specs, catalog, cache = indexed
    assert [s["study_id"] for s in CxrDataset(catalog, cache, split="train", image_size=32)] == [specs[0]["study"]]
    only = CxrDataset(catalog, cache, study_ids=[specs[2]["study"]], image_size=32)
    assert only.study_ids == [specs[2]["study"]]
    by_patient = CxrDataset(catalog, cache, patient_ids=[specs[0]["patient"]], image_size=32)
    assert by_patient.patient_ids == [specs[0]["patient"]] * 2
    # a partition of a large collection: more ids than SQLite binds in one statement (32766 in its default builds,
    # 250000 in others), with the real ones at the end
    many = [f"absent-{i}" for i in range(300_000)]
    assert CxrDataset(catalog, cache, study_ids=many + [specs[2]["study"]], image_size=32).study_ids == \
        [specs[2]["study"]]
    assert CxrDataset(catalog, cache, patient_ids=many + [specs[0]["patient"]], image_size=32).patient_ids == \
        [specs[0]["patient"]] * 2
    assert len(CxrDataset(catalog, cache, study_ids=many, image_size=32)) == 0
    seen = []

    def invert(image, image_id):
        seen.append(image_id)
        return 1.0 - image

    plain = CxrDataset(catalog, cache, image_size=32)
    inverted = CxrDataset(catalog, cache, image_size=32, site_transform=invert)
    torch.testing.assert_close(inverted[1]["image"], 1.0 - plain[1]["image"], atol=1e-5, rtol=0)
    assert seen == [specs[1]["images"][0][0]]
    restored = pickle.loads(pickle.dumps(plain))                    # what a DataLoader worker gets
    torch.testing.assert_close(restored[2]["image"], plain[2]["image"])
    train = CxrDataset(catalog, cache, image_size=32, augmentation={})
    assert train[0]["image"].shape == (1, 32, 32)
    # The simulation's scanner plugs in as a site transform: deterministic per image, visibly different.
    from client.data.scanner import apply_scanner, scanner_profile

    profile = scanner_profile(1)
    scanned = CxrDataset(catalog, cache, image_size=32, site_transform=lambda im, key: apply_scanner(im, profile, key))
    torch.testing.assert_close(scanned[0]["image"], scanned[0]["image"])
    assert (scanned[0]["image"] - plain[0]["image"]).abs().mean() > 0.01


@pytest.mark.parametrize("sections, regions, reason", [
    (None, None, "sentences have no section labels"),
    (["findings"], None, "section labels"),
    ("findings", None, "not a list"),
    (["summary"], None, "unknown sentence sections ['summary']"),
    (["findings"], [99], "region outside"),
    ("sentences", None, "not a list of texts"),
])
def test_a_study_whose_sentence_labels_do_not_match_is_left_out_by_name(indexed, caplog, sections, regions, reason):
    """A catalog row whose per-sentence sections or regions do not match its sentences (another writer, a hand
    edit) is left out of pre-training with the reason, recorded and logged; the other studies stay, and image-only
    evaluation keeps its image without the text."""
    specs, catalog, cache = indexed
    broken = specs[1]["study"]
    session = open_catalog(catalog).session()
    row = session.get(Study, broken)
    kept = list(row.sentences)
    if sections is not None and isinstance(sections, list) and len(sections) == 1:
        sections = sections * len(kept) if reason != "section labels" else sections * (len(kept) + 1)
    if sections == "sentences":   # the sentences themselves a string: never read character by character
        row.sentences, sections = "Heart size is normal.", ["findings"] * len("Heart size is normal.")
    row.sentence_section = sections
    if regions is not None:
        row.sentence_regions = regions * len(kept)
    session.commit()
    session.close()
    with caplog.at_level("WARNING", logger="client.data.dataset"):
        dataset = CxrDataset(catalog, cache, image_size=32)
    assert dataset.study_ids == [specs[0]["study"], specs[2]["study"]]
    assert list(dataset.refused_studies) == [broken] and reason in dataset.refused_studies[broken]
    assert broken in caplog.text and "client.data index" in caplog.text
    images_only = CxrDataset(catalog, cache, image_size=32, require_report=False)
    assert images_only.refused_studies == {} and broken in images_only.study_ids
    sample = images_only[images_only.study_ids.index(broken)]
    assert sample["sentences"] == [] and sample["report"] == ""


def test_usable_studies_lists_partition_keys(indexed):
    specs, catalog, _ = indexed
    entries = usable_studies(open_catalog(catalog))
    assert [(e.patient_id, e.study_id, e.split, e.images) for e in entries] == \
        [(s["patient"], s["study"], s["split"], 1) for s in specs]
    assert [1.0 if v == "1.0" else (-1.0 if v == "-1.0" else None) for v in specs[1]["labels"]] == \
        [None if math.isnan(v) else v for v in entries[1].labels]
    assert [e.study_id for e in usable_studies(open_catalog(catalog), split=["validate", "test"])] == \
        [specs[1]["study"], specs[2]["study"]]


def test_manifest_boxes_move_through_the_crop(tmp_path):
    pixels = np.zeros((80, 60), np.uint8)
    pixels[6:74, 6:54] = np.random.default_rng(0).integers(60, 250, (68, 48))
    PILImage.fromarray(pixels).save(tmp_path / "a.png")
    write_csv(tmp_path / "manifest.csv", ["image_path", "report", "boxes"],
              [["a.png", "FINDINGS: Big heart.", json.dumps({"heart": [0.5, 0.5, 0.9, 0.9]})]])
    index_data(open_layout("manifest", tmp_path), tmp_path / "c.sqlite", tmp_path / "cache", views=None)
    dataset = CxrDataset(tmp_path / "c.sqlite", tmp_path / "cache", image_size=32)
    heart = dataset.images[0].boxes[REGIONS.index("heart")]
    torch.testing.assert_close(heart, torch.tensor([(30 - 6) / 48, (40 - 6) / 68, (54 - 6) / 48, (72 - 6) / 68]))
    lung = dataset.images[0].boxes[REGIONS.index("left_lung")]
    torch.testing.assert_close(lung, torch.tensor(ZONE_ATLAS["left_lung"]))


# --- the phantom, end to end ----------------------------------------------------------------------

def test_phantom_round_trips_through_index_and_dataset(tmp_path):
    phantom = pytest.importorskip("simulations.phantom")
    root = phantom.generate_phantom(tmp_path / "phantom", 50, seed=3, size=96)
    truth = json.loads((root / "ground_truth.json").read_text())["studies"]
    summary = index_data(open_layout("mimic_cxr", root), tmp_path / "c.sqlite", tmp_path / "cache")
    n_images = sum(len(s["dicom_ids"]) for s in truth.values())
    assert summary["studies"] == 50 and summary["indexed"] == n_images
    assert set(summary["rejected"]) <= {"filtered_view"}
    csv_labels = {row["study_id"]: [float(row[n]) if row[n] else None for n in CHEXPERT_LABELS]
                  for row in read_gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")[1]}
    views = {row["dicom_id"]: row["ViewPosition"] for row in read_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")[1]}
    catalog = open_catalog(tmp_path / "c.sqlite")
    with catalog.session() as session:
        studies = {s.id: s for s in session.scalars(select(Study))}
        images = {i.id: i for i in session.scalars(select(Image))}
    assert studies.keys() == truth.keys()
    assert images.keys() == {d for s in truth.values() for d in s["dicom_ids"]}
    for study_id, expected in truth.items():
        study = studies[study_id]
        assert (study.patient_id, study.split, study.report_status) == (expected["subject_id"], expected["split"], "ok")
        assert study.labels == csv_labels[study_id]
        for dicom_id in expected["dicom_ids"]:
            image = images[dicom_id]
            assert image.study_id == study_id and image.view == views[dicom_id]
            assert (image.status, image.reason) == (("ok", None) if views[dicom_id] in ("PA", "AP")
                                                    else ("rejected", "filtered_view"))
    dataset = CxrDataset(tmp_path / "c.sqlite", tmp_path / "cache", image_size=32)
    frontal = {d for d, v in views.items() if v in ("PA", "AP")}
    assert {e.image_id for e in dataset.images} == frontal
    for index in range(0, len(dataset), 7):
        sample = dataset[index]
        assert truth[sample["study_id"]]["subject_id"] == sample["patient_id"]
        assert sample["image_id"] in truth[sample["study_id"]]["dicom_ids"]
        expected = torch.tensor([math.nan if v is None else v for v in csv_labels[sample["study_id"]]])
        torch.testing.assert_close(sample["labels"], expected, equal_nan=True)
    again = index_data(open_layout("mimic_cxr", root), tmp_path / "c.sqlite", tmp_path / "cache")
    assert (again["indexed"], again["unchanged"]) == (0, n_images)


def test_augmentation_settings_from_config():
    from client.data.transforms import augmentation_settings
    from shared_models.config import compose

    settings = augmentation_settings(compose([]).train)
    transform = TrainTransform(32, **settings)
    assert transform.scale == (0.9, 1.0) and transform.degrees == 2.0
    assert augmentation_settings(compose(["train.augmentation=null"]).train) is None
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['blur'\]"):
        augmentation_settings(compose(["+train.augmentation.blur=1"]).train)


def test_dataset_without_augmentation_is_deterministic(indexed):
    _, catalog, cache = indexed
    plain = CxrDataset(catalog, cache, image_size=32)
    augmented = CxrDataset(catalog, cache, image_size=32, augmentation={"degrees": 10.0})
    assert torch.equal(plain[0]["image"], plain[0]["image"])
    assert not torch.equal(augmented[0]["image"], augmented[0]["image"])
