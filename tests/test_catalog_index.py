"""Catalog and indexing: incremental, resumable after SIGKILL, bad inputs recorded, read-only catalog refused."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from client.data.__main__ import main as cli
from client.data.cache import ImageCache, to_cache_image
from client.data.catalog import CatalogError, Image, Study, open_catalog, usable_studies
from client.data.images import read_image
from client.data.index import index_data
from client.data.layouts import open_layout
from helpers.data import REPORT, chest_pixels, make_mimic, study_spec, write_dicom

PROJECT = Path(__file__).resolve().parents[1]


def index(root, tmp_path, **options):
    return index_data(open_layout("mimic_cxr", root), tmp_path / "catalog.sqlite", tmp_path / "cache", **options)


def images(tmp_path):
    catalog = open_catalog(tmp_path / "catalog.sqlite")
    with catalog.session() as session:
        return {row.id: row for row in session.scalars(select(Image))}


def test_index_twice_adds_nothing(tmp_path):
    specs = study_spec(4)
    root = make_mimic(tmp_path / "mimic", specs)
    first = index(root, tmp_path)
    n_images = sum(len(s["images"]) for s in specs)
    assert set(first) >= {"indexed", "unchanged", "rejected", "studies", "seconds"}
    assert (first["indexed"], first["unchanged"], first["studies"]) == (n_images, 0, 4)
    assert first["rejected"] == {"filtered_view": 4}          # one LATERAL per study
    rows = images(tmp_path)
    assert sorted(rows) == sorted(i for s in specs for i, _ in s["images"])
    assert {r.status for r in rows.values() if r.view == "LATERAL"} == {"rejected"}
    assert {r.status for r in rows.values() if r.view != "LATERAL"} == {"ok"}
    second = index(root, tmp_path)
    assert (second["indexed"], second["unchanged"], second["rejected"], second["studies"]) == (0, n_images, {}, 4)
    assert images(tmp_path).keys() == rows.keys()
    # No view filter: the laterals are now wanted, so only they are decoded.
    third = index(root, tmp_path, views=None)
    assert (third["indexed"], third["unchanged"], third["rejected"]) == (4, n_images - 4, {})
    assert all(r.status == "ok" for r in images(tmp_path).values())
    # A deleted cache is noticed: every image is decoded again, none is left pointing at nothing.
    shutil.rmtree(tmp_path / "cache")
    fourth = index(root, tmp_path, views=None)
    assert (fourth["indexed"], fourth["unchanged"]) == (n_images, 0)


def test_changed_file_is_reindexed_and_touched_file_is_not(tmp_path):
    specs = study_spec(2)
    root = make_mimic(tmp_path / "mimic", specs)
    index(root, tmp_path)
    before = images(tmp_path)
    image_id = specs[0]["images"][0][0]
    path = root / before[image_id].path
    write_dicom(path, chest_pixels(seed=99), view=None)           # new pixels, same size
    os.utime(path, ns=(before[image_id].mtime_ns + 10**9,) * 2)
    other = root / before[specs[1]["images"][0][0]].path
    os.utime(other, ns=(before[specs[1]["images"][0][0]].mtime_ns + 10**9,) * 2)   # touched only
    summary = index(root, tmp_path)
    assert (summary["indexed"], summary["unchanged"]) == (1, 3)
    after = images(tmp_path)
    assert after[image_id].sha256 != before[image_id].sha256
    assert after[image_id].cache_offset != before[image_id].cache_offset
    cache = ImageCache(tmp_path / "cache")
    row = after[image_id]
    expected, _ = to_cache_image(read_image(path).pixels)
    np.testing.assert_array_equal(cache.read(row.cache_shard, row.cache_offset, row.cache_height, row.cache_width),
                                  expected)
    touched = after[specs[1]["images"][0][0]]
    assert touched.mtime_ns == other.stat().st_mtime_ns and touched.cache_offset == \
        before[specs[1]["images"][0][0]].cache_offset


def test_bad_inputs_are_recorded_and_the_rest_indexes(tmp_path):
    specs = study_spec(6, images_per_study=1)
    for spec in specs:
        spec["images"] = [(spec["images"][0][0], "PA")]
    specs[4]["report"] = "   \n"
    root = make_mimic(tmp_path / "mimic", specs)
    rows = {spec["images"][0][0]: root / f"files/p{spec['patient'][:2]}/p{spec['patient']}/s{spec['study']}"
            for spec in specs}
    ids = list(rows)
    (rows[ids[0]] / f"{ids[0]}.dcm").write_bytes(b"")                                   # zero bytes
    (rows[ids[1]] / f"{ids[1]}.dcm").write_bytes(np.random.default_rng(0).bytes(3000))  # random bytes
    data = (rows[ids[2]] / f"{ids[2]}.dcm").read_bytes()
    (rows[ids[2]] / f"{ids[2]}.dcm").write_bytes(data[: len(data) // 2])                  # truncated
    rows[ids[5]].with_suffix(".txt").unlink()                                             # missing report
    summary = index(root, tmp_path)
    assert summary["indexed"] == 6 and summary["studies"] == 6
    assert summary["rejected"] == {"empty_file": 1, "not_dicom": 1, "truncated_file": 1,
                                   "empty_report": 1, "no_report": 1}
    catalog = open_catalog(tmp_path / "catalog.sqlite")
    with catalog.session() as session:
        got = {r.id: (r.status, r.reason) for r in session.scalars(select(Image))}
        assert got == {ids[0]: ("rejected", "empty_file"), ids[1]: ("rejected", "not_dicom"),
                       ids[2]: ("rejected", "truncated_file"), ids[3]: ("ok", None), ids[4]: ("ok", None),
                       ids[5]: ("ok", None)}
        assert all(r.detail for r in session.scalars(select(Image).where(Image.status == "rejected")))
        reports = {s.id: (s.report_status, s.report_reason) for s in session.scalars(select(Study))}
    assert reports[specs[4]["study"]] == ("rejected", "empty_report")
    assert reports[specs[5]["study"]] == ("rejected", "no_report")
    assert reports[specs[3]["study"]] == ("ok", None)
    # Only the study with a good image and a good report is usable.
    assert [s.study_id for s in usable_studies(catalog)] == [specs[3]["study"]]
    again = index(root, tmp_path)
    assert (again["indexed"], again["unchanged"], again["rejected"]) == (0, 6, {})


def test_parsed_report_fields_are_stored(tmp_path):
    specs = study_spec(1)
    root = make_mimic(tmp_path / "mimic", specs)
    index(root, tmp_path)
    with open_catalog(tmp_path / "catalog.sqlite").session() as session:
        study = session.get(Study, specs[0]["study"])
    assert study.report == REPORT.replace("small", "small (0)")
    assert "pleural effusion" in study.findings.lower() and "effusion" in study.impression.lower()
    assert len(study.sentences) == len(study.sentence_regions) >= 3
    assert any(t[1] == "pleural_effusion" and t[2] == "present" for t in study.triplets)
    assert any(t[1] == "pneumothorax" and t[2] == "absent" for t in study.triplets)
    assert study.labels[:2] == [1.0, None] and study.split == "train"


KILL_SCRIPT = """
import sys, time
import client.data.index as index
decode = index.decode_image
def slow(*args, **kwargs):
    time.sleep(0.05)
    return decode(*args, **kwargs)
index.decode_image = slow
index.COMMIT_EVERY = 2
from client.data.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_index_resumes_without_duplicates_or_losses(tmp_path):
    specs = study_spec(40, images_per_study=1)
    for spec in specs:
        spec["images"] = [(spec["images"][0][0], "PA")]
    root = make_mimic(tmp_path / "mimic", specs)
    catalog_path, cache = tmp_path / "catalog.sqlite", tmp_path / "cache"
    args = ["index", "--root", str(root), "--layout", "mimic_cxr", "--catalog", str(catalog_path),
            "--cache", str(cache)]
    log = open(tmp_path / "index.log", "w")
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=PROJECT,
                               stdout=log, stderr=subprocess.STDOUT)

    def committed():
        try:
            with closing(sqlite3.connect(catalog_path, timeout=5)) as connection:
                return connection.execute("SELECT count(*) FROM images").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    deadline = time.monotonic() + 60
    while committed() < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, \
        f"the indexer ended before it could be killed:\n{(tmp_path / 'index.log').read_text()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    killed_at = committed()
    assert 10 <= killed_at < 40, "the index must have been killed half-way"

    summary = index(root, tmp_path)
    assert summary["unchanged"] == killed_at and summary["indexed"] == 40 - killed_at
    rows = images(tmp_path)
    assert sorted(rows) == sorted(spec["images"][0][0] for spec in specs)
    reader = ImageCache(cache)
    spans = sorted((r.cache_shard, r.cache_offset, r.cache_offset + r.cache_height * r.cache_width)
                   for r in rows.values())
    assert all(a[2] <= b[1] for a, b in zip(spans, spans[1:]) if a[0] == b[0]), "cache entries overlap"
    for row in rows.values():
        expected, _ = to_cache_image(read_image(root / row.path).pixels)
        np.testing.assert_array_equal(
            reader.read(row.cache_shard, row.cache_offset, row.cache_height, row.cache_width), expected)


def test_read_only_catalog_is_refused_clearly(tmp_path):
    root = make_mimic(tmp_path / "mimic", study_spec(1))
    open_catalog(tmp_path / "c.sqlite").close()
    with pytest.raises(CatalogError, match="cannot write the catalog"):
        open_catalog(f"sqlite:///file:{tmp_path / 'c.sqlite'}?mode=ro&uri=true")
    with pytest.raises(CatalogError, match="does not exist"):
        open_catalog(tmp_path / "missing" / "c.sqlite")
    if os.geteuid() != 0:      # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(CatalogError, match="cannot write the catalog"):
            open_catalog(locked / "c.sqlite")
    assert cli(["index", "--root", str(root), "--layout", "mimic_cxr",
                "--catalog", str(tmp_path / "missing" / "c.sqlite")]) == 2


def test_sqlite_catalog_uses_wal_and_busy_timeout(tmp_path):
    catalog = open_catalog(tmp_path / "c.sqlite")
    with catalog.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_a_catalog_file_is_never_opened_outside_sqlite(tmp_path, monkeypatch):
    """Closing a second descriptor of a database file drops the POSIX locks SQLite holds on it in this process
    (sqlite.org/howtocorrupt.html 2.2): the catalog was found "malformed" after a simulation whose processes opened
    it again to read its header. open_catalog only stats the path; SQLite itself refuses a foreign file, which is
    still named in words, and a folder or a pipe is refused before SQLite opens it."""
    import builtins
    import io

    opened: list[str] = []
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, *a, _real=real, **k: (opened.append(str(path)), _real(path, *a, **k))[1])
    first = open_catalog(tmp_path / "c.sqlite")
    with first.engine.connect() as held:
        held.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
        open_catalog(tmp_path / "c.sqlite")
        open_catalog(tmp_path / "c.sqlite", readonly=True)
        open_catalog(f"sqlite:///{tmp_path / '.' / 'c.sqlite'}")   # another spelling of the same file
    foreign = tmp_path / "notes.sqlite"
    foreign.write_bytes(b"not a database at all, but long enough to hold a header" * 20)
    opened.clear()
    with pytest.raises(CatalogError, match="notes.sqlite: not an SQLite database"):
        open_catalog(foreign)
    with pytest.raises(CatalogError, match="notes.sqlite: not an SQLite database"):
        open_catalog(foreign, readonly=True)
    monkeypatch.undo()
    assert not [path for path in opened if "sqlite" in path]
    assert foreign.read_bytes().startswith(b"not a database")   # refused, not overwritten
    (tmp_path / "folder.sqlite").mkdir()
    os.mkfifo(tmp_path / "pipe.sqlite")
    for name, kind in (("folder.sqlite", "a folder"), ("pipe.sqlite", "not a regular file")):
        with pytest.raises(CatalogError, match=f"{name}: not a catalog \\({kind}\\)"):
            open_catalog(tmp_path / name)


def test_cli_writes_contract_json_and_refuses_wrong_paths(tmp_path, capsys):
    specs = study_spec(3)
    root = make_mimic(tmp_path / "mimic", specs, gz=True, reports="zip")
    out = tmp_path / "out" / "index.json"
    code = cli(["index", "--root", str(root), "--layout", "mimic_cxr", "--catalog", str(tmp_path / "c.sqlite"),
                "--json", str(out), "--views", "PA,AP,LATERAL"])
    assert code == 0
    summary = json.loads(out.read_text())
    assert (summary["indexed"], summary["unchanged"], summary["rejected"], summary["studies"]) == (6, 0, {}, 3)
    assert isinstance(summary["seconds"], float)
    assert summary["images"] == {"indexed": 6, "ok": 6, "rejected": {}, "unchanged": 0, "duplicates": 0}
    assert summary["reports"] == {"read": 3, "ok": 3, "rejected": {}, "unchanged": 0}
    assert "images: 6 indexed this run (6 ok, 0 rejected)" in capsys.readouterr().out
    assert (root / "fedcxr-image-cache" / "shard_00000.u8").is_file()
    assert cli(["index", "--root", str(tmp_path / "nowhere"), "--layout", "mimic_cxr",
                "--catalog", str(tmp_path / "c.sqlite")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert cli(["index", "--root", str(root), "--layout", "mimic_cxr", "--catalog", str(tmp_path / "c.sqlite"),
                "--reports", str(tmp_path / "no-reports")]) == 2
    assert "reports path does not exist" in capsys.readouterr().err


def test_worker_processes_give_the_same_catalog_and_cache(tmp_path):
    specs = study_spec(4)
    specs[1]["images"][0] = (specs[1]["images"][0][0], "LATERAL")
    root = make_mimic(tmp_path / "mimic", specs)
    (root / "files" / "p10" / f"p{specs[2]['patient']}" / f"s{specs[2]['study']}" /
     f"{specs[2]['images'][0][0]}.dcm").write_bytes(b"not a dicom")
    outcomes = []
    for workers in (0, 2):
        folder = tmp_path / f"workers{workers}"
        folder.mkdir()
        summary = index_data(open_layout("mimic_cxr", root), folder / "c.sqlite", folder / "cache", workers=workers)
        reader = ImageCache(folder / "cache")
        with open_catalog(folder / "c.sqlite").session() as session:
            rows = {r.id: (r.status, r.reason, r.view, r.sha256, r.rows, r.cols, r.crop_x0, r.crop_y1)
                    for r in session.scalars(select(Image))}
            pixels = {r.id: np.array(reader.read(r.cache_shard, r.cache_offset, r.cache_height, r.cache_width))
                      for r in session.scalars(select(Image).where(Image.status == "ok"))}
        outcomes.append((summary, rows, pixels))
    (single, rows, pixels), (parallel, rows_parallel, pixels_parallel) = outcomes
    assert single["rejected"] == parallel["rejected"] == {"filtered_view": 5, "not_dicom": 1}
    assert rows == rows_parallel and pixels.keys() == pixels_parallel.keys() and len(pixels) == 2
    for image_id, image in pixels.items():
        np.testing.assert_array_equal(image, pixels_parallel[image_id])


def test_two_indexers_at_once_share_the_work_without_duplicates(tmp_path):
    specs = study_spec(12, images_per_study=1)
    for spec in specs:
        spec["images"] = [(spec["images"][0][0], "PA")]
    root = make_mimic(tmp_path / "mimic", specs)
    args = ["index", "--root", str(root), "--layout", "mimic_cxr", "--catalog", str(tmp_path / "catalog.sqlite"),
            "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "other.json")]
    other = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=PROJECT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mine = index(root, tmp_path)
    assert other.wait(timeout=120) == 0, other.stderr.read().decode()
    theirs = json.loads((tmp_path / "other.json").read_text())
    assert mine["indexed"] + theirs["indexed"] == 12 and mine["unchanged"] + theirs["unchanged"] == 12
    assert sorted(images(tmp_path)) == sorted(spec["images"][0][0] for spec in specs)


def test_a_changed_report_or_parser_is_parsed_again(tmp_path, monkeypatch):
    import client.data.index as index_module

    specs = study_spec(2)
    root = make_mimic(tmp_path / "mimic", specs)
    index(root, tmp_path)
    report = root / f"files/p{specs[0]['patient'][:2]}/p{specs[0]['patient']}/s{specs[0]['study']}.txt"
    report.write_text("FINDINGS: Moderate right pleural effusion.\nIMPRESSION: Right effusion.\n")
    summary = index(root, tmp_path)
    assert (summary["indexed"], summary["rejected"]) == (0, {})
    with open_catalog(tmp_path / "catalog.sqlite").session() as session:
        study = session.get(Study, specs[0]["study"])
        untouched = session.get(Study, specs[1]["study"])
    assert study.impression == "Right effusion." and "Moderate right" in study.findings
    parsed = []
    real_parse = index_module.Indexer.set_report
    monkeypatch.setattr(index_module.Indexer, "set_report",
                        lambda self, row, *args: parsed.append(row.id) or real_parse(self, row, *args))
    index(root, tmp_path)
    assert parsed == []                                             # same text, same parser: nothing to do
    monkeypatch.setattr(index_module, "parser_fingerprint", lambda: "a-new-parser")
    index(root, tmp_path)
    assert sorted(parsed) == sorted(s["study"] for s in specs)      # a new parser re-parses every report
    assert untouched.report_status == "ok"
