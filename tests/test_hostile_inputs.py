"""The indexer over a folder of hostile files: each is rejected or read, with its reason in the catalog, in bounded memory."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
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
from helpers.data import DX_SOP_CLASS, REPORT, chest_pixels, write_dicom

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


# --- hostile lists and files through the index CLI (client.data.__main__.main) ---------------------------------

from client.data.__main__ import main as data_cli                      # noqa: E402
from client.data.catalog import DataWarning, usable_studies            # noqa: E402

REAL_DICOM = "cr-chest-mono1-10bit-nometa.dcm"    # 388 KB, decodes in ~20 ms


def index_cli(root: Path, catalog: Path, *options: str, layout: str = "manifest") -> tuple[int, dict]:
    out = catalog.with_suffix(".json")
    code = data_cli(["index", "--root", str(root), "--layout", layout, "--catalog", str(catalog),
                     "--cache", str(catalog.parent / f"{catalog.stem}-cache"), "--views", "all", "--json", str(out),
                     *options])
    return code, (json.loads(out.read_text()) if code == 0 else {})


def catalog_state(catalog: Path) -> tuple[dict, dict, list]:
    """(image id -> (status, reason, detail, mask_path), study id -> row, warnings as (code, source, line, detail))."""
    with open_catalog(catalog, readonly=True).session() as session:
        images = {r.id: (r.status, r.reason, r.detail, r.mask_path) for r in session.scalars(select(Image))}
        studies = {r.id: r for r in session.scalars(select(Study))}
        warnings = [(w.code, w.source, w.line, w.detail) for w in session.scalars(select(DataWarning))]
    return images, studies, warnings


def manifest(root: Path, rows: list[str], header: str = "image_path,report,study_id,patient_id,split") -> None:
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


@pytest.mark.timeout(120)
def test_listed_paths_must_stay_inside_the_root_unless_allowed(tmp_path, shared_dicom_dir):
    root, outside = tmp_path / "site", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    for folder, name in ((root / "img", "a.dcm"), (outside, "x.dcm")):
        shutil.copyfile(shared_dicom_dir / REAL_DICOM, folder / name)
    os.symlink(outside / "x.dcm", root / "img" / "link_out.dcm")      # a symlink leading out
    os.symlink("a.dcm", root / "img" / "link_in.dcm")                 # one staying inside: fine
    os.symlink("/dev/zero", root / "img" / "zero.dcm")
    os.mkfifo(root / "img" / "pipe.dcm")
    report = "FINDINGS: Clear lungs."
    manifest(root, [f"img/a.dcm,{report},S1,P1,train,../outside/m.png", f"../outside/x.dcm,{report},S2,P2,train,",
                    f"{outside / 'x.dcm'},{report},S3,P3,train,", f"img/link_out.dcm,{report},S4,P4,train,",
                    f"img/link_in.dcm,{report},S5,P5,train,img/m.png", f"img/zero.dcm,{report},S6,P6,train,",
                    f"img/pipe.dcm,{report},S7,P7,train,"], header="image_path,report,study_id,patient_id,split,mask_path")
    code, summary = index_cli(root, tmp_path / "c.sqlite")
    assert code == 0
    images, _, warnings = catalog_state(tmp_path / "c.sqlite")
    # A mask listed outside the root is dropped with a warning; the image itself is still used.
    assert (images["img/a"][3], images["img/link_in"][3]) == (None, "img/m.png")
    assert [(code, source) for code, source, _, _ in warnings] == [("outside_root", "img/a.dcm")]
    reasons = {image_id: reason for image_id, (_, reason, _, _) in images.items()}
    assert reasons == {"img/a": None, "../outside/x": "outside_root", str(outside / "x"): "outside_root",
                       "img/link_out": "outside_root", "img/link_in": None, "img/zero": "outside_root",
                       "img/pipe": "not_a_regular_file"}
    assert summary["images"]["rejected"] == {"not_a_regular_file": 1, "outside_root": 4}
    assert summary["rejected"] == summary["images"]["rejected"] and summary["images"]["ok"] == 2
    assert "--allow-outside-root" in images["../outside/x"][2]

    # Shared storage, opted into: the files outside are read; a device is still refused, without being read.
    code, summary = index_cli(root, tmp_path / "shared.sqlite", "--allow-outside-root")
    images, _, _ = catalog_state(tmp_path / "shared.sqlite")
    assert {i: r for i, (_, r, _, _) in images.items() if r} == {"img/zero": "not_a_regular_file",
                                                                 "img/pipe": "not_a_regular_file"}
    assert summary["images"]["ok"] == 5


@pytest.mark.timeout(60)
def test_hostile_reports_and_record_list_paths_in_the_mimic_layout(tmp_path, shared_dicom_dir):
    """A FIFO report (indexing used to hang), a report linked to /dev/zero (read until MemoryError), NUL bytes,
    a zip entry over the limit, and a record-list path climbing out with '..'."""
    root = tmp_path / "mimic"
    patient = root / "files" / "p10" / "p10000001"
    records = []
    for n in range(6):
        study = patient / f"s5000000{n}"
        study.mkdir(parents=True)
        shutil.copyfile(shared_dicom_dir / REAL_DICOM, study / f"d{n}.dcm")
        records.append(f"10000001,5000000{n},d{n},files/p10/p10000001/s5000000{n}/d{n}.dcm")
    (tmp_path / "outside.dcm").write_bytes((shared_dicom_dir / REAL_DICOM).read_bytes())
    records.append("10000001,50000006,d6,files/p10/../../../outside.dcm")
    (root / "cxr-record-list.csv").write_text("subject_id,study_id,dicom_id,path\n" + "\n".join(records) + "\n")
    (patient / "s50000000.txt").write_text("FINDINGS: Clear lungs. IMPRESSION: Normal.")
    os.mkfifo(patient / "s50000001.txt")
    os.symlink("/dev/zero", patient / "s50000002.txt")
    (patient / "s50000003.txt").write_bytes(b"FINDINGS: clear\x00 lungs.")
    (patient / "s50000004.txt").mkdir()
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as archive:   # ~2 KB on disk
        archive.writestr("mimic-cxr-reports/files/p10/p10000001/s50000005.txt", "A" * 2_000_000)
    code, summary = index_cli(root, tmp_path / "c.sqlite", layout="mimic_cxr")
    assert code == 0
    images, studies, _ = catalog_state(tmp_path / "c.sqlite")
    assert {s: (row.report_status, row.report_reason) for s, row in studies.items()} == {
        "50000000": ("ok", None), "50000001": ("rejected", "not_a_regular_file"),
        "50000002": ("rejected", "outside_root"), "50000003": ("rejected", "nul_bytes"),
        "50000004": ("rejected", "not_a_regular_file"), "50000005": ("rejected", "report_too_large"),
        "50000006": ("rejected", "no_report")}
    assert images["d6"][:2] == ("rejected", "outside_root")
    assert all(images[f"d{n}"][0] == "ok" for n in range(6))
    assert summary["reports"]["rejected"] == {"no_report": 1, "not_a_regular_file": 2, "nul_bytes": 1,
                                              "outside_root": 1, "report_too_large": 1}
    assert summary["images"]["rejected"] == {"outside_root": 1} and summary["images"]["ok"] == 6
    assert sum(summary["rejected"].values()) == 7      # the contract's key: images and reports together


def test_conflicting_studies_and_bad_rows_are_left_out_with_their_line(tmp_path, shared_dicom_dir, caplog):
    root = tmp_path / "site"
    root.mkdir()
    for name in "abcdefghij":
        shutil.copyfile(shared_dicom_dir / REAL_DICOM, root / f"{name}.dcm")
    report = "FINDINGS: Clear lungs."
    manifest(root, [
        f"a.dcm,{report},S1,P1,train,,,",   # line 2: S1 on two patients
        f"b.dcm,{report},S1,P2,train,,,",
        f"c.dcm,{report},S2,P3,train,,,",   # line 4: S2 in two splits (a test image inside a training study)
        f"d.dcm,{report},S2,P3,test,,,",
        f"e.dcm,{report},S3,P4,train,1,,",  # line 6: S3 labelled twice, differently
        f"f.dcm,{report},S3,P4,train,0,,",
        f'x.dcm,"{"A" * 5_000_000}",S9,P9,train,,,',   # line 8: a field over the CSV limit
        f"y.dcm,FINDINGS: clear\x00,S9,P9,train,,,",   # line 9: a NUL byte
        f",{report},S9,P9,train,,,",                   # line 10: no image_path
        f"g.dcm,{report},S4,P5,train,,,",
        f'z.dcm,{report},S9,P9,train,,"{{""heart"": 3}}",',  # line 12: boxes that are not boxes
        f"h.dcm,{report},S5,P6,train,,,dup",
        f"i.dcm,{report},S6,P7,train,,,dup",          # line 14: an image id listed again, in another study
        f'j.dcm,"FINDINGS: {"B" * 300_000}",S7,P8,train,,,',  # line 15: a report over 256 KiB
    ], header="image_path,report,study_id,patient_id,split,Cardiomegaly,boxes,image_id")
    code, summary = index_cli(root, tmp_path / "c.sqlite")
    assert code == 0
    images, studies, warnings = catalog_state(tmp_path / "c.sqlite")
    assert {i: r for i, (_, r, _, _) in images.items()} == {
        "a": "conflicting_study", "b": "conflicting_study", "c": "conflicting_study", "d": "conflicting_study",
        "e": "conflicting_study", "f": "conflicting_study", "g": None, "dup": None, "j": None}
    assert (studies["S7"].report_reason, studies["S7"].report_status) == ("report_too_large", "rejected")
    assert "manifest.csv line 15" in studies["S7"].report_detail
    assert "patient 'P2'" in images["b"][2] and "split 'test'" in images["d"][2] and "Cardiomegaly" in images["f"][2]
    assert {s.study_id for s in usable_studies(open_catalog(tmp_path / "c.sqlite", readonly=True))} == {"S4", "S5"}
    assert "S6" not in studies                                   # no study without images left behind
    rows = sorted((code, line) for code, source, line, _ in warnings if line)
    assert rows == [("bad_manifest_row", 8), ("bad_manifest_row", 10), ("bad_manifest_row", 12), ("nul_bytes", 9)]
    assert all(source == "manifest.csv" for code, source, line, _ in warnings if line)
    assert {code for code, *_ in warnings} == {"bad_manifest_row", "nul_bytes", "conflicting_study",
                                               "duplicate_image", "study_without_images"}
    assert summary["rows"]["rejected"] == {"bad_manifest_row": 3, "nul_bytes": 1}
    assert summary["images"]["rejected"] == {"conflicting_study": 6} and summary["images"]["ok"] == 3
    assert summary["reports"]["rejected"] == {"report_too_large": 1}
    assert summary["warnings"] == {"total": 9, "new": 9}

    # The same data again: the warnings stay in the catalog but are not shouted a second time.
    caplog.clear()
    code, again = index_cli(root, tmp_path / "c.sqlite")
    assert again["warnings"] == {"total": 9, "new": 0} and again["images"]["unchanged"] == 9
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert catalog_state(tmp_path / "c.sqlite")[2] == warnings

    # What a site checks before joining.
    assert data_cli(["summary", "--catalog", str(tmp_path / "c.sqlite"), "--json", str(tmp_path / "s.json")]) == 0
    site = json.loads((tmp_path / "s.json").read_text())["sites"]["(no site)"]
    assert site["images"] == {"ok": 3, "rejected": 6, "rejected_by_reason": {"conflicting_study": 6}}
    assert (site["usable_studies"], site["patients"], site["report_coverage"]) == (2, 3, 0.6667)
    assert site["reports_rejected_by_reason"] == {"report_too_large": 1}
    assert json.loads((tmp_path / "s.json").read_text())["warnings"]["total"] == 9


def test_catalog_and_flags_are_refused_in_words(tmp_path, capsys):
    root = tmp_path / "site"
    root.mkdir()
    manifest(root, ["a.dcm,FINDINGS: clear.,S1,P1,train"])
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert index_cli(root, junk)[0] == 2
    assert f"{junk}: not an SQLite database" in capsys.readouterr().err
    assert data_cli(["summary", "--catalog", str(junk)]) == 2
    assert "not an SQLite database" in capsys.readouterr().err
    code = data_cli(["index", "--root", str(root), "--layout", "manifest",
                     "--catalog", "postgresql+psycopg2://fed:s3cret@127.0.0.1/catalog"])
    error = capsys.readouterr().err
    assert code == 2 and "'psycopg2' is not installed" in error and "pip install psycopg2" in error
    assert "s3cret" not in error and "Traceback" not in error
    for flag, value in (("--max-pixels", "-1"), ("--workers", "-2"), ("--short-side", "abc")):
        with pytest.raises(SystemExit) as stopped:
            data_cli(["index", "--root", str(root), "--layout", "manifest", "--catalog", str(tmp_path / "c.sqlite"),
                      flag, value])
        assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_a_row_removed_or_now_refused_stops_being_used(tmp_path, shared_dicom_dir):
    root = tmp_path / "site"
    root.mkdir()
    for name in "abc":
        shutil.copyfile(shared_dicom_dir / REAL_DICOM, root / f"{name}.dcm")
    rows = [f"{name}.dcm,FINDINGS: Clear lungs.,S{name},P{name},train" for name in "abc"]
    manifest(root, rows)
    assert index_cli(root, tmp_path / "c.sqlite")[1]["images"]["ok"] == 3
    manifest(root, [rows[0], rows[1].replace("Clear", "Clear\x00")])      # c removed, b now refused (NUL)
    _, summary = index_cli(root, tmp_path / "c.sqlite")
    assert summary["images"]["rejected"] == {"no_longer_listed": 2} and summary["rows"]["rejected"] == {"nul_bytes": 1}
    images, _, _ = catalog_state(tmp_path / "c.sqlite")
    assert {i: r for i, (_, r, _, _) in images.items()} == {"a": None, "b": "no_longer_listed", "c": "no_longer_listed"}
    assert [s.study_id for s in usable_studies(open_catalog(tmp_path / "c.sqlite", readonly=True))] == ["Sa"]
    manifest(root, rows)                                                  # listed again: decoded and used again
    _, summary = index_cli(root, tmp_path / "c.sqlite")
    assert (summary["images"]["ok"], summary["images"]["unchanged"]) == (2, 1)
    assert len(usable_studies(open_catalog(tmp_path / "c.sqlite", readonly=True))) == 3
