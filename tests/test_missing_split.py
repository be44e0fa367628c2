"""A hospital's export without a `split` column: the site trains on every study; a simulation, which needs
held-out patients, says which column to add and how."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from client.data.__main__ import main as data_cli
from shared_models.config import compose

REAL_DICOM = "cr-chest-mono1-10bit-nometa.dcm"


def export_without_split(tmp_path: Path, shared_dicom_dir: Path, split_column: bool = False) -> tuple[Path, Path]:
    root = tmp_path / "site"
    root.mkdir(parents=True)
    rows = []
    for k in range(4):
        shutil.copyfile(shared_dicom_dir / REAL_DICOM, root / f"x{k}.dcm")
        rows.append(f"x{k}.dcm,FINDINGS: Clear lungs {k}.,S{k},P{k}" + (",test" if split_column and k == 3 else
                                                                       ",train" if split_column else ""))
    header = "image_path,report,study_id,patient_id" + (",split" if split_column else "")
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    catalog = tmp_path / "c.sqlite"
    assert data_cli(["index", "--root", str(root), "--layout", "manifest", "--catalog", str(catalog),
                     "--cache", str(tmp_path / "cache")]) == 0
    return root, catalog


@pytest.mark.parametrize("split_column, trained", [(False, 4), (True, 3)])
def test_a_site_trains_on_its_train_split_or_every_study_without_one(tmp_path, shared_dicom_dir, split_column, trained):
    from client.federated import site_dataset

    root, catalog = export_without_split(tmp_path, shared_dicom_dir, split_column)
    site = {"name": "A", "data": {"root": str(root), "layout": "manifest"}, "state_dir": str(tmp_path / "state"),
            "catalog": str(catalog), "cache": str(tmp_path / "cache")}
    dataset = site_dataset(site, compose(["model=tiny"]))
    assert len(dataset) == trained          # the test-split study stays out when the column exists


def test_a_simulation_names_the_missing_split_column(tmp_path, shared_dicom_dir):
    from simulations.run import missing_split_hint

    _, catalog = export_without_split(tmp_path, shared_dicom_dir)
    assert "add a `split` column to the manifest" in missing_split_hint(catalog, "train")
    _, catalog = export_without_split(tmp_path / "b", shared_dicom_dir, split_column=True)
    assert missing_split_hint(catalog, "validate").endswith("['test', 'train']: set partition.split to one of them")
