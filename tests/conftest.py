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
    """The helpers.data.PHANTOM_200 phantom generated and indexed once per test session: (root, catalog path, cache
    dir). A test that composes a config over it adds PHANTOM_200 and cache_dir=<root's grandparent>."""
    from helpers.data import PHANTOM_200
    from shared_models.config import compose
    from simulations.data import prepare_data

    base = tmp_path_factory.mktemp("phantom_200")
    data = prepare_data(compose([*PHANTOM_200, f"cache_dir={base}"]).data)
    return data.root, data.catalog, data.cache


# End-to-end modules: real deployments on 127.0.0.1, Flower simulations, CLI runs that train. `pytest -m unit`
# runs the rest in a few minutes; `make test` runs both. A test elsewhere can opt in with @pytest.mark.e2e.
E2E_MODULES = {"test_federation", "test_faults", "test_secagg", "test_simulation", "test_privacy_simulation",
               "test_privacy_sweep", "test_real_collections", "test_provision", "test_benchmarks",
               "test_site_supervisor", "test_distributed", "test_privacy_audit"}
# End-to-end tests in unit modules: the trainer's smoke test draws and indexes the 200-study phantom, trains the
# whole hybrid objective for 60 steps and measures retrieval: a training run end to end, and the longest test
# outside the modules above; its same-seed test trains the same model on that phantom (it would draw the phantom
# for itself alone in a unit run). The others start Python processes that import the stack (seconds each on 2 cores):
# an indexer killed mid-run and one racing another, a ledger reopened by a second process, a SuperLink, and the
# hostile-input index run in a child process that measures its own peak memory.
E2E_TESTS = {"tests/test_trainer.py::test_training_smoke_hybrid_lowers_every_term_and_learns_retrieval",
             "tests/test_trainer.py::test_same_seed_same_loss_history",
             "tests/test_phantom.py::test_worker_processes_write_the_same_bytes",
             "tests/test_catalog_index.py::test_killed_index_resumes_without_duplicates_or_losses",
             "tests/test_catalog_index.py::test_two_indexers_at_once_share_the_work_without_duplicates",
             "tests/test_privacy.py::test_ledger_survives_a_restart_and_composes_across_runs",
             "tests/test_registry.py::test_registry_found_beside_a_running_superlink",
             *(f"tests/test_hostile_inputs.py::{name}" for name in (
                 "test_every_hostile_image_has_its_reason_in_the_catalog",
                 "test_every_hostile_report_has_its_reason_in_the_catalog",
                 "test_summary_counts_match_the_catalog_and_memory_stays_bounded",
                 "test_rerun_over_hostile_files_changes_nothing"))}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end (deployments, simulations, CLI training runs)")
    config.addinivalue_line("markers", "unit: everything else (added automatically)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") is None and (item.module.__name__.rsplit(".", 1)[-1] in E2E_MODULES
                                                       or item.nodeid in E2E_TESTS):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.unit)
