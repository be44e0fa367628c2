"""Two tiny phantom sites for the federation tests: one small phantom, indexed once per session, split by study."""
from __future__ import annotations

import fcntl
from pathlib import Path

STUDIES = 30          # ~2 x 12 training studies after the phantom's train/validate/test split
SITE_STUDIES = {"A": slice(0, 9), "B": slice(9, None)}  # different sizes: FedAvg's weights differ


def phantom_data(base: Path) -> tuple[Path, str, Path]:
    """(root, catalog, cache) of a STUDIES-study, 128-px phantom under `base`, generated and indexed on first use."""
    from client.data.index import index_data
    from client.data.layouts import open_layout
    from simulations.phantom import generate_phantom

    root, catalog, cache = base / "phantom", str(base / "catalog.sqlite"), base / "image_cache"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:  # pytest-xdist workers share the base folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / ".indexed").is_file():
            if not (root / "ground_truth.json").is_file():
                generate_phantom(root, STUDIES, seed=0, size=128)
            index_data(open_layout("mimic_cxr", root), catalog, cache, views=["PA", "AP"], short_side=128)
            (base / ".indexed").touch()
    return root, catalog, cache


def train_studies(catalog: str) -> list[str]:
    from sqlalchemy import select

    from client.data.catalog import Study, open_catalog

    db = open_catalog(catalog, readonly=True)
    try:
        with db.session() as session:
            return sorted(session.scalars(select(Study.id).where(Study.split == "train", Study.report_status == "ok")))
    finally:
        db.close()


def phantom_sites(base: Path) -> dict[str, dict]:
    """Site-file entries (data, catalog, cache, studies) of sites A and B over one shared phantom catalog."""
    root, catalog, cache = phantom_data(base)
    studies = train_studies(catalog)
    return {name: {"data": {"root": str(root), "layout": "mimic_cxr", "split": "train", "index": False},
                   "catalog": catalog, "cache": str(cache), "studies": studies[part], "scanner": None}
            for name, part in SITE_STUDIES.items()}
