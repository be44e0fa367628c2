"""Make a data config ready to train on: generate the phantom when asked and absent, then index it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from client.data.index import index_data
from client.data.layouts import open_layout

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    root: Path
    catalog: str
    cache: Path
    index_summary: dict


def prepare_data(data_cfg: DictConfig) -> PreparedData:
    """Generate (phantom only, when absent) and index `data_cfg.root`; indexing is incremental."""
    if data_cfg.get("benchmark"):
        raise ValueError(f"data.benchmark={data_cfg.benchmark} is a public benchmark without reports: it evaluates an "
                         "encoder (python -m evaluation.run checkpoint=CKPT data=" f"{data_cfg.benchmark} "
                         "data.root=DIR) and cannot pre-train one; pre-train on data=mimic_cxr, mimic_cxr_jpg, "
                         "manifest or phantom")
    root = Path(data_cfg.root)
    if data_cfg.get("generate") and not (root / "ground_truth.json").is_file():
        from simulations.phantom import generate_phantom

        log.info("generating the phantom (%d studies, seed %d) into %s", data_cfg.studies, data_cfg.phantom_seed, root)
        # a few hundred studies and more pay for starting a process per core (the same bytes either way)
        workers = min(len(os.sched_getaffinity(0)), 8) if int(data_cfg.studies) >= 200 else 1
        generate_phantom(root, data_cfg.studies, data_cfg.phantom_seed, size=int(data_cfg.image_height),
                         held_out=float(data_cfg.held_out),
                         finding_contrast=float(data_cfg.get("finding_contrast", 1.0)), workers=workers)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; set data.root to the folder holding the data")
    options = {"manifest": data_cfg.manifest} if data_cfg.get("manifest") else {}
    layout = open_layout(data_cfg.layout, root, reports=data_cfg.get("reports"),
                         allow_outside_root=bool(data_cfg.get("allow_outside_root", False)), **options)
    summary = index_data(
        layout,
        str(data_cfg.catalog),
        data_cfg.cache,
        views=list(data_cfg.views) if data_cfg.get("views") else None,
        max_pixels=int(data_cfg.max_pixels),
        short_side=int(data_cfg.cache_short_side),
    )
    log.info("catalog %s: %s", data_cfg.catalog, summary)
    return PreparedData(root=root, catalog=str(data_cfg.catalog), cache=Path(data_cfg.cache), index_summary=summary)
