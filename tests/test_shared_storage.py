"""The shared-storage opt-in (`allow_outside_root`) travels from every entry point to the index: a site file,
a simulation's or evaluation's `data.allow_outside_root`; without it, files linked from outside the root stay out."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from client.data.catalog import Image, open_catalog
from client.site import SiteConfigError, load_site
from shared_models.config import compose

REAL_DICOM = "cr-chest-mono1-10bit-nometa.dcm"


def site_with_linked_image(tmp_path: Path, shared_dicom_dir: Path) -> Path:
    """A manifest site whose one image is a symlink into a folder beside the root (a NAS, say)."""
    root, nas = tmp_path / "site", tmp_path / "nas"
    root.mkdir()
    nas.mkdir()
    shutil.copyfile(shared_dicom_dir / REAL_DICOM, nas / "x.dcm")
    os.symlink(nas / "x.dcm", root / "x.dcm")
    (root / "manifest.csv").write_text("image_path,report,study_id,patient_id,split\n"
                                       "x.dcm,FINDINGS: Clear lungs.,S1,P1,train\n")
    return root


def statuses(catalog: Path) -> dict[str, tuple[str, str | None]]:
    with open_catalog(catalog, readonly=True).session() as session:
        return {r.id: (r.status, r.reason) for r in session.scalars(select(Image))}


@pytest.mark.parametrize("allow", [False, True])
def test_data_config_opt_in_reaches_the_index(tmp_path, shared_dicom_dir, allow):
    from simulations.data import prepare_data

    root = site_with_linked_image(tmp_path, shared_dicom_dir)
    data = compose(["data=manifest", f"data.root={root}", f"data.allow_outside_root={str(allow).lower()}"]).data
    prepare_data(data)
    expected = ("ok", None) if allow else ("rejected", "outside_root")
    assert statuses(Path(data.catalog)) == {"x": expected}


@pytest.mark.parametrize("allow", [False, True])
def test_site_file_opt_in_reaches_the_index(tmp_path, shared_dicom_dir, allow):
    import client.run as run

    root = site_with_linked_image(tmp_path, shared_dicom_dir)
    site = {"name": "A", "data": {"root": str(root), "layout": "manifest", "allow_outside_root": allow},
            "state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "c.sqlite"), "cache": str(tmp_path / "cache")}
    run.index_data(site)
    expected = ("ok", None) if allow else ("rejected", "outside_root")
    assert statuses(tmp_path / "c.sqlite") == {"x": expected}


def test_site_file_opt_in_must_be_a_boolean(tmp_path):
    path = tmp_path / "A.yaml"
    path.write_text(f"name: A\ndata: {{root: {tmp_path}, layout: manifest, allow_outside_root: 'yes'}}\n"
                    f"superlink: 127.0.0.1:9092\nroot_certificates: {tmp_path}/ca.crt\n"
                    f"node_private_key: {tmp_path}/k\nstate_dir: {tmp_path}/state\n"
                    "privacy: {max_epsilon: 8.0, max_delta: 1.0e-5}\n")
    with pytest.raises(SiteConfigError, match="allow_outside_root must be true or false"):
        load_site(path, check_files=False)


def test_site_file_names_its_manifest_and_reports(tmp_path, shared_dicom_dir):
    """A hospital's export is `export.csv`, not manifest.csv; a MIMIC-JPG site's reports sit in a separate folder:
    the site file says so and the index reads them."""
    import client.run as run

    root = tmp_path / "site"
    root.mkdir()
    shutil.copyfile(shared_dicom_dir / REAL_DICOM, root / "x.dcm")
    (root / "export.csv").write_text("image_path,report,study_id,patient_id,split\n"
                                     "x.dcm,FINDINGS: Clear lungs.,S1,P1,train\n")
    site = {"name": "A", "data": {"root": str(root), "layout": "manifest", "manifest": "export.csv"},
            "state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "c.sqlite"), "cache": str(tmp_path / "cache")}
    run.index_data(site)
    assert statuses(tmp_path / "c.sqlite") == {"x": ("ok", None)}

    path = tmp_path / "A.yaml"
    path.write_text(f"name: A\ndata: {{root: {root}, layout: mimic_cxr_jpg, reports: reports}}\n"
                    f"superlink: 127.0.0.1:9092\nroot_certificates: {tmp_path}/ca.crt\n"
                    f"node_private_key: {tmp_path}/k\nstate_dir: {tmp_path}/state\n"
                    "privacy: {max_epsilon: 8.0, max_delta: 1.0e-5}\n")
    loaded = load_site(path, check_files=False)
    assert Path(loaded["data"]["reports"]).is_absolute()   # relative paths are from the project root, like root's
    import client.data.__main__ as data_cli

    seen = []
    original = data_cli.main
    data_cli.main = lambda argv: seen.append(argv) or 0
    try:
        run.index_data(loaded)
    finally:
        data_cli.main = original
    assert seen[0][seen[0].index("--reports") + 1] == loaded["data"]["reports"]
