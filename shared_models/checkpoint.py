"""Checkpoint folders (contracts.md): model.safetensors, meta.json (config, fingerprints, sha256), tokenizer/."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared_models.config import config_hash
from shared_models.factory import create_model
from shared_models.model import PretrainModel
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(
    folder: str | Path,
    model: PretrainModel,
    cfg: DictConfig | dict,
    step: int | None = None,
    round: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint folder; meta.json goes last, so its presence marks a complete checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    data = save_safetensors({name: t.detach().cpu().contiguous().clone() for name, t in state.items()})
    _write_atomic(folder / MODEL_FILE, data)
    model.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    meta = {
        "config": config,
        "step": step,
        "round": round,
        "shared": shared_parameter_names(model, **sharing_settings(cfg)),
        "fingerprints": checkpoint_fingerprints(cfg, model.tokenizer),
        "sha256": {MODEL_FILE: hashlib.sha256(data).hexdigest()},
    }
    _write_atomic(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
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
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    data = path.read_bytes()
    expected = meta.get("sha256", {}).get(MODEL_FILE)
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path} has sha256 {actual[:12]}…, but meta.json records {expected[:12]}…: the file is truncated or "
            f"altered; copy the checkpoint again or use an earlier one"
        )
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
    model = create_model({**cfg, "model": {**cfg["model"], "image": {**cfg["model"]["image"], "pretrained": False}}},
                         tokenizer=tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{folder / MODEL_FILE} holds tensors this model does not have: {unexpected[:5]}…")
    absent_shared = set(missing) & set(shared_parameter_names(model, **sharing_settings(cfg)))
    if absent_shared:
        raise CheckpointError(f"{folder / MODEL_FILE} lacks shared parameters: {sorted(absent_shared)[:5]}…")
    return model, meta
