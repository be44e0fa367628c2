"""Layouts: MIMIC-CXR / MIMIC-CXR-JPG / manifest read into studies with ids, views, splits, labels, reports."""
import pytest

from client.data.errors import Rejected
from client.data.layouts import LAYOUTS, LayoutError, decode_report, open_layout, view_allowed
from helpers.data import make_mimic, study_spec, write_csv


def expected_labels(spec):
    return [float(v) if v else None for v in spec["labels"]]


def check_mimic(layout, specs):
    studies = {s.study_id: s for s in layout.studies()}
    assert sorted(studies) == sorted(spec["study"] for spec in specs)
    for spec in specs:
        study = studies[spec["study"]]
        assert study.patient_id == spec["patient"]
        assert study.split == spec["split"]
        assert [(i.image_id, i.view) for i in study.images] == spec["images"]
        assert all(i.path == f"files/p{spec['patient'][:2]}/p{spec['patient']}/s{spec['study']}/{i.image_id}.dcm"
                   for i in study.images)
        assert layout.read_report(study) == spec["report"]
    return studies


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("reports", ["tree", "folder", "zip"])
def test_mimic_csvs_plain_or_gzipped_and_reports_from_tree_folder_or_zip(tmp_path, gz, reports):
    specs = study_spec(5)
    root = make_mimic(tmp_path / "mimic", specs, gz=gz, reports=reports)
    layout = open_layout("mimic_cxr", root, tmp_path / "reports" if reports == "folder" else None)
    studies = check_mimic(layout, specs)
    for spec in specs:
        assert studies[spec["study"]].labels == expected_labels(spec)


def test_absent_label_csv_and_record_list(tmp_path):
    specs = study_spec(3)
    root = make_mimic(tmp_path / "mimic", specs, chexpert=False, record_list=False)
    studies = check_mimic(open_layout("mimic_cxr", root), specs)
    assert all(study.labels is None for study in studies.values())


def test_walks_files_when_no_csv_at_all(tmp_path):
    specs = study_spec(3)
    root = make_mimic(tmp_path / "mimic", specs, record_list=False)
    for csv_file in root.glob("*.csv"):
        csv_file.unlink()
    studies = {s.study_id: s for s in open_layout("mimic_cxr", root).studies()}
    assert sorted(studies) == [spec["study"] for spec in specs]
    for spec in specs:
        assert sorted(i.image_id for i in studies[spec["study"]].images) == sorted(i for i, _ in spec["images"])
        assert all(i.view is None for i in studies[spec["study"]].images)   # the header decides later


def test_missing_report_is_rejected_per_study(tmp_path):
    specs = study_spec(2)
    root = make_mimic(tmp_path / "mimic", specs)
    (root / f"files/p{specs[1]['patient'][:2]}/p{specs[1]['patient']}/s{specs[1]['study']}.txt").unlink()
    layout = open_layout("mimic_cxr", root)
    first, second = layout.studies()
    assert layout.read_report(first) == specs[0]["report"]
    with pytest.raises(Rejected) as caught:
        layout.read_report(second)
    assert caught.value.code == "no_report"


def test_jpg_layout_reads_gzipped_metadata_and_needs_reports(tmp_path):
    specs = study_spec(3)
    root = make_mimic(tmp_path / "jpg", specs, gz=True, reports="folder", record_list=False, extension=".jpg")
    with pytest.raises(LayoutError, match="reports"):
        open_layout("mimic_cxr_jpg", root)
    layout = open_layout("mimic_cxr_jpg", root, tmp_path / "reports")
    studies = {s.study_id: s for s in layout.studies()}
    for spec in specs:
        study = studies[spec["study"]]
        assert [(i.image_id, i.view, i.path.endswith(".jpg")) for i in study.images] == \
            [(i, v, True) for i, v in spec["images"]]
        assert study.labels == expected_labels(spec)
        assert layout.read_report(study) == spec["report"]


def test_wrong_root_and_missing_files_folder_name_the_path(tmp_path):
    with pytest.raises(LayoutError, match=str(tmp_path / "nowhere")):
        open_layout("mimic_cxr", tmp_path / "nowhere")
    with pytest.raises(LayoutError, match="no files/ folder"):
        open_layout("mimic_cxr", tmp_path)
    with pytest.raises(LayoutError, match="unknown layout"):
        open_layout("padchest", tmp_path)
    assert set(LAYOUTS) == {"mimic_cxr", "mimic_cxr_jpg", "manifest"}


def test_csv_missing_a_required_column_names_file_and_column(tmp_path):
    root = make_mimic(tmp_path / "mimic", study_spec(1))
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id"], [["a", "1"]])
    with pytest.raises(LayoutError, match=r"split\.csv: missing column\(s\) split"):
        open_layout("mimic_cxr", root).studies()


def test_manifest_with_report_column_and_optional_ids(tmp_path):
    header = ["image_path", "report", "patient_id", "study_id", "view", "site", "split", "Cardiomegaly", "mask_path"]
    rows = [["img/a.png", "FINDINGS: Big heart.", "P1", "S1", "pa", "north", "train", "1.0", "masks/a.png"],
            ["img/b.png", "FINDINGS: Big heart.", "P1", "S1", "LATERAL", "north", "train", "1.0", ""],
            ["img/c.png", "IMPRESSION: Normal.", "", "", "AP", "south", "test", "", ""]]
    write_csv(tmp_path / "manifest.csv", header, rows)
    studies = open_layout("manifest", tmp_path).studies()
    again = open_layout("manifest", tmp_path).studies()
    assert [(s.patient_id, s.study_id) for s in studies] == [(s.patient_id, s.study_id) for s in again]
    first, second = studies
    assert (first.patient_id, first.study_id, first.split) == ("P1", "S1", "train")
    assert [(i.image_id, i.view, i.site, i.mask_path) for i in first.images] == [
        ("img/a", "PA", "north", "masks/a.png"), ("img/b", "LATERAL", "north", None)]
    assert first.labels == {"Cardiomegaly": 1.0}   # a manifest's labels: its label columns by name
    # Derived ids: deterministic, distinct, and the study's patient derived from the study.
    assert second.study_id.startswith("s") and second.patient_id.startswith("p")
    assert second.study_id != second.patient_id and second.labels == {"Cardiomegaly": None}
    layout = open_layout("manifest", tmp_path)
    assert layout.read_report(second) == "IMPRESSION: Normal."


def test_manifest_with_findings_and_impression(tmp_path):
    write_csv(tmp_path / "list.csv", ["image_path", "findings", "impression"],
              [["x.dcm", "Lungs are clear.", "No acute process."], ["y.dcm", "", "Effusion."]])
    layout = open_layout("manifest", tmp_path, manifest="list.csv")
    x, y = layout.studies()
    assert layout.read_report(x) == "FINDINGS: Lungs are clear.\nIMPRESSION: No acute process."
    assert layout.read_report(y) == "IMPRESSION: Effusion."
    assert x.labels is None and [i.path for i in x.images + y.images] == ["x.dcm", "y.dcm"]


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(LayoutError, match="manifest not found"):
        open_layout("manifest", tmp_path)
    write_csv(tmp_path / "manifest.csv", ["image_path", "notes"], [["x.png", "hello"]])
    with pytest.raises(LayoutError, match="report column"):
        open_layout("manifest", tmp_path).studies()
    write_csv(tmp_path / "manifest.csv", ["path", "report"], [["x.png", "hello"]])
    with pytest.raises(LayoutError, match="missing column.*image_path"):
        open_layout("manifest", tmp_path).studies()


def test_view_filter():
    assert view_allowed("PA", ["PA", "AP"]) and view_allowed("ap", ["PA", "AP"])
    assert not view_allowed("LATERAL", ["PA", "AP"]) and not view_allowed(None, ["PA"])
    assert view_allowed(None, None) and view_allowed("LL", None)


def test_report_decoding_rejects_with_reason():
    assert decode_report("é FINDINGS".encode("utf-8-sig"), "r.txt") == "é FINDINGS"
    for data, code in [(b"x" * 2000, "report_too_large"), (b"FIND\x00INGS", "nul_bytes"),
                       (b"\xff\xfe\xfa bad", "unreadable_text")]:
        with pytest.raises(Rejected) as caught:
            decode_report(data, "r.txt", max_bytes=1000)
        assert caught.value.code == code and "r.txt" in caught.value.detail
