"""The indexer over a folder of hostile files: each is rejected or read, with its reason in the catalog, in bounded memory."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from sqlalchemy import select

from client.data.catalog import Image, Study, open_catalog
from client.data.errors import REASON_CODES
from client.data.index import index_data
from client.data.layouts import LayoutError, open_layout
from data_fixtures import DX_SOP_CLASS, REPORT, chest_pixels, write_dicom

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HUGE = 20_000              # rows and columns the hostile headers claim: 400 M pixels, 800 MB as uint16
MAX_PIXELS = 20_000_000    # the index's limit in this test, so a real over-limit file stays small on disk
BIG = 5_000                # a complete 5000 x 5000 DICOM (50 MB): indexing it without the limit peaks ~200 MB higher
RSS_GROWTH_LIMIT_MB = 100  # measured growth with the limit: ~5 MB


def huge_dicom(path: Path, encapsulated: bool) -> Path:
    """A header claiming HUGE x HUGE 16-bit pixels, with a few bytes of pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless if encapsulated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = HUGE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)]) if encapsulated else bytes(8)
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_png(path: Path) -> Path:
    """A valid PNG signature and header claiming HUGE x HUGE gray pixels, with an empty image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", HUGE, HUGE, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def no_pixels_dicom(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)
    return path


def build_hostile_tree(root: Path) -> tuple[dict[str, set[str | None]], dict[str, str | None]]:
    """A MIMIC-CXR-style tree, one study per hostile file; returns the expected reason per image id and study.

    None means "read fine". Images sit in studies with good reports and reports beside good images,
    so each row tests one thing.
    """
    patient = root / "files" / "p10" / "p10000001"
    images: dict[str, set[str | None]] = {}
    reports: dict[str, str | None] = {}
    counter = iter(range(10_000))

    def study(report: bytes | None = REPORT.encode(), expected_report: str | None = None) -> Path:
        study_id = f"5{next(counter):07d}"
        folder = patient / f"s{study_id}"
        folder.mkdir(parents=True)
        if report is not None:
            (patient / f"s{study_id}.txt").write_bytes(report)
        reports[study_id] = expected_report
        return folder

    def image(name: str, expected, make) -> None:
        folder = study()
        make(folder / name)
        images[os.fsdecode(name)[:-4]] = expected if isinstance(expected, set) else {expected}

    good = write_dicom(root / "good.dcm", chest_pixels())
    data = good.read_bytes()
    image("good.dcm", None, lambda p: p.write_bytes(data))
    image("with space é 画像.dcm", None, lambda p: p.write_bytes(data))
    image("zero.dcm", "empty_file", lambda p: p.write_bytes(b""))
    image("truncated.dcm", "truncated_file", lambda p: p.write_bytes(data[: len(data) // 2]))
    image("header_only.dcm", "truncated_file", lambda p: p.write_bytes(data[:200]))
    image("random.dcm", "not_dicom", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)))
    # Random bytes behind a valid preamble: pydicom parses garbage elements; any clear reason will do.
    image("random_preamble.dcm", {"truncated_file", "not_dicom", "not_an_image", "undecodable_pixels"},
          lambda p: p.write_bytes(bytes(128) + b"DICM" + np.random.default_rng(1).bytes(5000)))
    image("text.dcm", "not_dicom", lambda p: p.write_text("this is not an image\n"))
    image("structured_report.dcm", "not_an_image", no_pixels_dicom)
    image("huge_native.dcm", "too_large", lambda p: huge_dicom(p, encapsulated=False))
    image("huge_jpeg2000.dcm", "too_large", lambda p: huge_dicom(p, encapsulated=True))
    image("huge_png.dcm", "too_large", huge_png)
    big = np.tile(np.arange(BIG, dtype=np.uint16) % 4096, (BIG, 1))
    image("big_but_complete.dcm", "too_large", lambda p: write_dicom(p, big))
    image("loop_self.dcm", "unreadable_path", lambda p: os.symlink(p.name, p))
    folder = study()
    os.symlink("loop_b.dcm", folder / "loop_a.dcm")
    os.symlink("loop_a.dcm", folder / "loop_b.dcm")
    images["loop_a"] = images["loop_b"] = {"unreadable_path"}
    image("folder.dcm", "not_a_regular_file", lambda p: p.mkdir())
    image("pipe.dcm", "not_a_regular_file", lambda p: os.mkfifo(p))        # hashing it would block forever
    image("endless.dcm", "outside_root", lambda p: os.symlink("/dev/zero", p))  # ...or never end
    bad_name = os.fsdecode(b"bad\xff\xfe name.dcm")                          # not UTF-8: the catalog cannot store it
    folder = study()
    (folder / bad_name).write_bytes(data)
    images["bad\\xff\\xfe name"] = {"unreadable_path"}
    # A study folder that links back to its patient: the walk must not follow it forever.
    os.symlink(".", patient / "s59999999")

    for report, expected in [(b"FINDINGS: caf\xe9 normal.\xff\xfe", "unreadable_text"),
                             (b"FINDINGS: No acute process. " * 40_000, "report_too_large"),   # 1.1 MB
                             (b"", "empty_report"), (b"   \n\t ", "empty_report"),
                             (b"FINDINGS: clear\x00\x00 lungs.", "nul_bytes"),
                             (None, "no_report"),
                             ("FINDINGS: Lungs clear — no effusion. IMPRESSION: Normal ✓.".encode(), None)]:
        folder = study(report, expected)
        (folder / f"img{folder.name}.dcm").write_bytes(data)
        images[f"img{folder.name}"] = {None}
    return images, reports


INDEX_CHILD = """
import json, sys
from benchmarks.memory import peak_rss_mb
from client.data.images import read_image
from client.data.index import index_data
from client.data.layouts import open_layout
from client.data.reports import parse_report
read_image(sys.argv[1]); parse_report("FINDINGS: warm-up. IMPRESSION: none.")   # lazy imports, first-use buffers
before = peak_rss_mb()
summary = index_data(open_layout("mimic_cxr", sys.argv[1].rsplit("/", 1)[0]), sys.argv[2], sys.argv[3], views=None,
                     max_pixels=int(sys.argv[4]))
print(json.dumps({"summary": summary, "before_mb": before, "after_mb": peak_rss_mb()}))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    images, reports = build_hostile_tree(root)
    catalog, cache = root.parent / "hostile.sqlite", root.parent / "hostile-cache"
    # A fresh process, so its peak resident memory measures this index run alone; a hang fails the test.
    done = subprocess.run([sys.executable, "-c", INDEX_CHILD, str(root / "good.dcm"), str(catalog), str(cache),
                           str(MAX_PIXELS)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, catalog, cache, images, reports, json.loads(done.stdout.strip().splitlines()[-1])


def test_every_hostile_image_has_its_reason_in_the_catalog(hostile):
    _, catalog, _, images, _, _ = hostile
    with open_catalog(catalog, readonly=True).session() as session:
        rows = {row.id: row for row in session.scalars(select(Image))}
    assert set(rows) == set(images), "every listed file has exactly one row, none invented"
    for image_id, expected in images.items():
        row = rows[image_id]
        assert row.reason in expected, f"{image_id}: {row.reason} ({row.detail}), expected one of {expected}"
        if row.reason is None:
            assert row.status == "ok" and row.cache_shard is not None
        else:
            assert row.status == "rejected" and row.reason in REASON_CODES
            assert row.detail and row.reason != "internal_error"


def test_every_hostile_report_has_its_reason_in_the_catalog(hostile):
    _, catalog, _, _, reports, _ = hostile
    with open_catalog(catalog, readonly=True).session() as session:
        rows = {row.id: row for row in session.scalars(select(Study))}
    assert set(reports) <= set(rows)
    for study_id, expected in reports.items():
        row = rows[study_id]
        assert row.report_reason == expected, f"{study_id}: {row.report_reason} ({row.report_detail})"
        assert (row.report_status == "ok") == (expected is None)
    assert rows["50000001"].report is not None       # the study of the unicode file name, read whole


def test_summary_counts_match_the_catalog_and_memory_stays_bounded(hostile):
    _, _, _, images, reports, child = hostile
    expected_rejections = sum(None not in codes for codes in images.values()) + sum(
        code is not None for code in reports.values())
    assert sum(child["summary"]["rejected"].values()) == expected_rejections
    assert child["summary"]["indexed"] == len(images)
    growth = child["after_mb"] - child["before_mb"]
    assert growth < RSS_GROWTH_LIMIT_MB, f"indexing grew peak RSS by {growth:.0f} MB"


def test_rerun_over_hostile_files_changes_nothing(hostile):
    root, catalog, cache, images, _, _ = hostile
    with open_catalog(catalog, readonly=True).session() as session:
        before = {row.id: (row.status, row.reason, row.index_run_id) for row in session.scalars(select(Image))}
    summary = index_data(open_layout("mimic_cxr", root), catalog, cache, views=None, max_pixels=MAX_PIXELS)
    assert summary["indexed"] == 0 and summary["unchanged"] == len(images)
    with open_catalog(catalog, readonly=True).session() as session:
        after = {row.id: (row.status, row.reason, row.index_run_id) for row in session.scalars(select(Image))}
    assert after == before


def test_manifest_with_unicode_paths_and_a_non_utf8_manifest(tmp_path):
    folder = tmp_path / "dossier à espaces"
    folder.mkdir()
    write_dicom(folder / "图像 1.dcm", chest_pixels())
    (tmp_path / "manifest.csv").write_text(
        "image_path,report\n"
        f"dossier à espaces/图像 1.dcm,\"{REPORT}\"\n"
        "dossier à espaces/missing file.dcm,FINDINGS: clear.\n", encoding="utf-8")
    summary = index_data(open_layout("manifest", tmp_path), tmp_path / "c.sqlite", tmp_path / "cache", views=None)
    assert summary["indexed"] == 2 and summary["rejected"] == {"file_not_found": 1}
    with open_catalog(tmp_path / "c.sqlite", readonly=True).session() as session:
        statuses = {row.path: row.status for row in session.scalars(select(Image))}
    assert statuses == {"dossier à espaces/图像 1.dcm": "ok", "dossier à espaces/missing file.dcm": "rejected"}

    # A row that is not UTF-8 is left out with its line number; the rows around it are listed.
    (tmp_path / "manifest.csv").write_bytes(b"image_path,report\nx\xff.dcm,FINDINGS: clear.\ny.dcm,FINDINGS: clear.\n")
    layout = open_layout("manifest", tmp_path)
    assert [image.path for study in layout.studies() for image in study.images] == ["y.dcm"]
    assert [(p.code, p.source, p.line) for p in layout.problems] == [("bad_manifest_row", "manifest.csv", 2)]
    assert "UTF-8" in layout.problems[0].detail
