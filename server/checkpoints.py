"""Per-round checkpoints of the global shared parameters: atomic writes, hash-checked loads.

Each round folder is also a `shared_models.checkpoint` folder (model.safetensors, tokenizer/, meta.json with
the composed config and the shared names), so `load_checkpoint`, `evaluation.run` and the export read it; it is
written and read through that module's one writer (`write_folder`, `read_verified`).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from shared_models.checkpoint import META_FILE, MODEL_FILE, TOKENIZER_DIR, read_verified, write_atomic, write_folder
from shared_models.transfer import contiguous

log = logging.getLogger(__name__)

SERVER_STATE_FILE = "server_state.safetensors"  # FedAdam/FedYogi moments
__all__ = ["Checkpoint", "discard_after", "load_latest_valid", "round_dir", "save_round", "write_atomic"]


@dataclass
class Checkpoint:
    round: int
    path: Path
    params: dict[str, np.ndarray]
    meta: dict
    server_state: dict[str, np.ndarray]


def round_dir(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{round_:04d}"


def save_round(
    run_dir: Path,
    round_: int,
    params: dict[str, np.ndarray],
    meta: dict,
    server_state: dict[str, np.ndarray] | None = None,
    tokenizer=None,
) -> tuple[Path, dict]:
    """Write round `round_`'s checkpoint folder (meta.json last: it marks completeness), refresh checkpoint/;
    returns the folder and the meta written (with the files' sha256). `tokenizer` (the model's) goes to tokenizer/."""
    folder = round_dir(run_dir, round_)
    latest = Path(run_dir) / "checkpoint"
    if tokenizer is not None:
        for target in (folder, latest):
            tokenizer.save_pretrained(target / TOKENIZER_DIR)
    files = {MODEL_FILE: save_safetensors({k: contiguous(v) for k, v in params.items()})}
    if server_state:
        files[SERVER_STATE_FILE] = save_safetensors({k: contiguous(v) for k, v in server_state.items()})
    meta = write_folder(folder, files, dict(meta, round=round_))
    write_folder(latest, files, meta)
    for stale in {SERVER_STATE_FILE} - set(files):
        (latest / stale).unlink(missing_ok=True)
    return folder, meta


def _read_verified(folder: Path) -> Checkpoint:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} is missing (the round did not finish writing)")
    meta = json.loads(meta_path.read_text())
    # every file meta.json lists is checked against its sha256 (CheckpointError, a ValueError, names the file)
    loaded = {name: load_safetensors(read_verified(folder / name, expected)) for name, expected in meta["sha256"].items()}
    return Checkpoint(int(meta["round"]), folder, loaded[MODEL_FILE], meta, loaded.get(SERVER_STATE_FILE, {}))


def load_latest_valid(run_dir: Path) -> Checkpoint | None:
    """The newest round whose files match their recorded hashes; damaged rounds are logged and skipped."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("round_[0-9][0-9][0-9][0-9]"), reverse=True)
    for folder in folders:
        try:
            return _read_verified(folder)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            log.error("checkpoint %s is unusable, falling back to the previous round: %s", folder, err)
    return None


def discard_after(run_dir: Path, round_: int) -> None:
    """Remove round folders newer than `round_` (damaged or from an abandoned attempt) before resuming."""
    for folder in (Path(run_dir) / "checkpoints").glob("round_[0-9][0-9][0-9][0-9]"):
        if int(folder.name.split("_")[1]) > round_:
            shutil.rmtree(folder)
