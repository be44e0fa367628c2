"""Composing the run configuration from `configs/` the same way in every entry point and process."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from shared_models.objectives.schedule import LEGACY_KEYS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# A run's name becomes a folder at the coordinator and under every site's state_dir: both ends check it with this.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_run_name(name) -> bool:
    return isinstance(name, str) and RUN_NAME.fullmatch(name) is not None and name not in (".", "..")


class RenamedKeyError(ValueError):
    """An override sets a config key that has been renamed or retired; the message names the key to use."""


# Old key -> the key to use instead, and why (docs/glossary.md: one name per concept). Hydra's own refusal of an
# unknown key would not say where the setting went, and a `+key=` override would add it and be silently ignored.
RENAMED_KEYS = {
    "federation.validate_updates": "federation.update_norm_action (the server checks every reply it sees; under "
                                   "SecAgg+ it sees only the mean, so only clip is accepted there: docs/privacy.md)",
    "partition.strategy": "partition.name (which split makes the virtual sites; partition=NAME picks one; a "
                          "federation's strategy is federation.strategy)",
    "federation.batch_size": "train.batch_size (one batch size for a site's rounds and the centralized run; the "
                             "round config carries it to the sites)",
    "federation.lr": "train.lr (one learning rate for a site's rounds and the centralized run; the round config "
                     "carries it to the sites)",
    # the seg start's old keys, which old checkpoints still hold (read there with their new names)
    **{f"objective.schedule.{old}": f"objective.schedule.{new} (when seg starts; the lr warm-up is train.warmup_steps)"
       for old, new in LEGACY_KEYS.items()},
}


def check_renamed_keys(overrides: list[str]) -> None:
    """RenamedKeyError for the first override that sets a key of `RENAMED_KEYS`."""
    for line in overrides:
        key = line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key in RENAMED_KEYS:
            raise RenamedKeyError(f"override {line!r}: {key} is no longer a setting; use {RENAMED_KEYS[key]}")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The composed config for these Hydra overrides, outside a Hydra app (ServerApp, ClientApp, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_renamed_keys(list(overrides or []))
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def hydra_entry(command: str, task: Callable[[DictConfig], object], config_name: str = "config") -> None:
    """Run `task` as a Hydra app whose run directory is outputs/<command>/<timestamp>/."""
    import hydra

    try:
        check_renamed_keys([arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except RenamedKeyError as err:
        raise SystemExit(f"error: {err}") from None
    if not any(arg.startswith("hydra.job.name=") for arg in sys.argv[1:]):
        sys.argv.insert(1, f"hydra.job.name={command}")
    hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()


def config_hash(section: DictConfig | dict | None) -> str:
    """A stable short hash of a config section (sites compare these before training)."""
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    payload = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]

