"""Checkpoint folders (contracts.md): model.safetensors, meta.json (config, fingerprints, sha256), tokenizer/.

This module is also the one writer of everything a run keeps on disk to resume or reuse: `write_atomic` (the
file is the old one or the complete new one, fsynced with its folder, even after a crash or a failed write),
`write_folder` (files first, meta.json with their sha256 last: its presence marks a complete folder) and
`hashed_tensors_bytes` (a single safetensors file that records its own sha256, for state with no meta.json
beside it). The server's round checkpoints, a site's local state and the centralized run all go through it;
every read checks the recorded sha256 (`read_verified`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy_tensors
from safetensors.numpy import save as save_numpy_tensors
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared_models.config import config_hash
from shared_models.factory import create_model
from shared_models.model import PretrainModel
from shared_models.objectives.schedule import upgrade_schedule_keys
from shared_models.sharing import shared_parameter_names, sharing_settings
from shared_models.tokenizer import build_tokenizer, tokenizer_hash

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, altered, or does not match its own metadata."""


def checkpoint_fingerprints(cfg: DictConfig | dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Hashes of the model config, objective and the built tokenizer (vocabulary and normalisation)."""
    return {
        "model": config_hash(cfg["model"]),
        "objective": config_hash(cfg["objective"]),
        "tokenizer": tokenizer_hash(tokenizer),
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: str | Path, data: bytes) -> str:
    """Write `data` so that `path` is either the old file or the complete new one, even after a crash; returns
    its sha256. A write that fails midway (disk full, I/O error) leaves the old file and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder's entry is on disk
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return sha256(data)


def read_verified(path: str | Path, expected: str | None) -> bytes:
    """The bytes of `path`, refused (CheckpointError) unless their sha256 is `expected`; None: a file written
    before its hash was recorded, read as it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    data = path.read_bytes()
    actual = sha256(data)
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path} has sha256 {actual[:12]}…, but the recorded one is {expected[:12]}…: the file is truncated or "
            f"altered; copy it again or use an earlier one"
        )
    return data


def meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True, default=str).encode()


def write_folder(folder: str | Path, files: dict[str, bytes], meta: dict) -> dict:
    """Write each of `files` into `folder`, then meta.json (`meta` plus each file's sha256) last, so that a folder
    with a meta.json is complete. Returns the meta written."""
    folder = Path(folder)
    hashes = {name: write_atomic(folder / name, data) for name, data in files.items()}
    meta = dict(meta, sha256=hashes)
    write_atomic(folder / META_FILE, meta_bytes(meta))
    return meta


HASH_KEY = "sha256"  # in a self-hashed safetensors file's header: the sha256 of the same tensors saved without it


def hashed_tensors_bytes(arrays: dict[str, np.ndarray], **notes: str) -> bytes:
    """safetensors bytes of `arrays` whose header records their sha256 (and `notes`, e.g. a companion file's hash):
    a file that any safetensors reader loads and `read_hashed_tensors` verifies."""
    return save_numpy_tensors(arrays, metadata={**notes, HASH_KEY: sha256(save_numpy_tensors(arrays))})


def read_hashed_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, header notes) of a file written from `hashed_tensors_bytes`, or CheckpointError if the tensors do not
    match the sha256 their header records. A file without one (written before hashes were recorded) is read as is."""
    path = Path(path)
    data = read_verified(path, None)
    try:
        header_length = int.from_bytes(data[:8], "little")
        notes = json.loads(data[8:8 + header_length]).get("__metadata__") or {}
        arrays = load_numpy_tensors(data)
    except (ValueError, AttributeError, SafetensorError) as error:   # a header that is no JSON object, or torn
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}): it is truncated or altered") from error
    expected = notes.get(HASH_KEY)
    if expected is not None and sha256(save_numpy_tensors(arrays)) != expected:
        raise CheckpointError(f"{path}'s tensors do not match the sha256 its header records: the file is truncated or "
                              "altered")
    return arrays, notes


def save_checkpoint(
    folder: str | Path,
    model: PretrainModel,
    cfg: DictConfig | dict,
    step: int | None = None,
    round: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the checkpoint folder; meta.json goes last, so its presence marks a complete checkpoint. `extra_files`
    (e.g. the optimizer's state) are written and hashed with the weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    data = save_safetensors({name: t.detach().cpu().contiguous().clone() for name, t in state.items()})
    model.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    meta = {
        "config": config,
        "step": step,
        "round": round,
        "shared": shared_parameter_names(model, **sharing_settings(cfg)),
        "fingerprints": checkpoint_fingerprints(cfg, model.tokenizer),
    }
    write_folder(folder, {MODEL_FILE: data, **(extra_files or {})}, meta)
    return folder


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a checkpoint folder, or its writing did not finish")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is damaged") from error


def read_state(folder: str | Path, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors`, after checking them against the sha256 in meta.json."""
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    path = folder / MODEL_FILE
    data = read_verified(path, meta.get("sha256", {}).get(MODEL_FILE))
    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error


def load_checkpoint(folder: str | Path) -> tuple[PretrainModel, dict]:
    """Rebuild the model from meta.json's config and load the weights; returns (model, meta).

    A federation's global checkpoint holds only the shared parameters: the local-only ones then keep
    their fresh initialisation. A missing shared tensor, or one the model does not have, is an error.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    state = read_state(folder, meta)
    cfg = meta.get("config")
    if not cfg or "model" not in cfg or "objective" not in cfg:
        raise CheckpointError(f"{folder / META_FILE} has no composed config with `model` and `objective`")
    tokenizer_dir = folder / TOKENIZER_DIR
    has_tokenizer = tokenizer_dir.is_dir()
    # A checkpoint without tokenizer/ (the server's global one) gets the tokenizer its config builds.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if has_tokenizer else build_tokenizer(cfg["model"]["text"])
    expected, actual = meta.get("fingerprints", {}), checkpoint_fingerprints(cfg, tokenizer)
    checked = ["model", "objective"] + (["tokenizer"] if has_tokenizer else [])
    mismatched = [key for key in checked if key in expected and expected[key] != actual[key]]
    if mismatched:
        details = ", ".join(f"{key} {actual[key]} (meta.json: {expected[key]})" for key in mismatched)
        raise CheckpointError(f"{folder}: fingerprint mismatch, {details}; the folder mixes files of different runs")
    # The checkpoint holds the image weights: its pretrained file need not exist on this machine.
    model = create_model({**cfg, "objective": upgrade_schedule_keys(cfg["objective"]),
                          "model": {**cfg["model"], "image": {**cfg["model"]["image"], "pretrained": False}}},
                         tokenizer=tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{folder / MODEL_FILE} holds tensors this model does not have: {unexpected[:5]}…")
    absent_shared = set(missing) & set(shared_parameter_names(model, **sharing_settings(cfg)))
    if absent_shared:
        raise CheckpointError(f"{folder / MODEL_FILE} lacks shared parameters: {sorted(absent_shared)[:5]}…")
    return model, meta
