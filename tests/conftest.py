"""Shared test setup: single-threaded torch (CI has 2 cores), offline hub, and the shared data paths."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_dicom_dir() -> Path:
    path = SHARED_DATA / "dicom"
    if not path.is_dir():
        pytest.skip("../shared/data/dicom is not present")
    return path


@pytest.fixture
def iu_reports_tgz() -> Path:
    path = SHARED_DATA / "iu-xray-reports" / "iu-reports-dev.tgz"
    if not path.is_file():
        pytest.skip("../shared/data/iu-xray-reports/iu-reports-dev.tgz is not present")
    return path


@pytest.fixture(scope="session")
def phantom_200(tmp_path_factory) -> tuple[Path, str, Path]:
    """A 200-study phantom generated and indexed once per test session: (root, catalog path, cache dir)."""
    from shared_models.config import compose
    from simulations.data import prepare_data

    base = tmp_path_factory.mktemp("phantom_200")
    data = prepare_data(compose(["data=phantom", "data.studies=200", f"cache_dir={base}"]).data)
    return data.root, data.catalog, data.cache
