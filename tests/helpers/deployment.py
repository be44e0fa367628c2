"""What the modules that deploy share: the skip without Flower's entry points, and a real deployment on
127.0.0.1 (simulations.deployment) of sites A and B over the session's one small phantom."""
from __future__ import annotations

from pathlib import Path

import pytest

from simulations.deployment import Deployment, phantom_site_fields
from simulations.flower import BIN

needs_flwr = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flwr's entry points are not installed")


def phantom_sites(tmp_path_factory) -> dict[str, dict]:
    """Site-file entries of A and B over one 30-study phantom, generated once for every module of the session."""
    return phantom_site_fields(tmp_path_factory.getbasetemp() / "federation_phantom")


def deploy(tmp_path_factory, name: str, app=None, extra_sites: dict[str, dict] | None = None,
           unregistered: list[str] = (), database: bool = True) -> Deployment:
    """A `Deployment` of the registered sites A and B (plus `extra_sites`, e.g. an `unregistered` one) in a new
    folder `name`; `app` is a bundle or a function of the folder that stages one. Use it as a context manager (it
    starts on enter and stops every process on exit).

    `database=False` keeps the SuperLink's state in memory: only a test that restarts the SuperLink needs the
    file. On a loaded machine the file's SQLite lock times out now and then, and the SuperExec that starts the
    ServerApps exits on that error, so every later run of the deployment would wait for nothing."""
    folder = tmp_path_factory.mktemp(name)
    return Deployment(folder, ["A", "B"], app=app(folder) if callable(app) else app, database=database,
                      site_fields={**phantom_sites(tmp_path_factory), **(extra_sites or {})}, unregistered=unregistered)
