"""The one checkpoint writer (shared_models.checkpoint): a failed write leaves the old file and no temporary, every
read checks the recorded sha256, and the server's rounds, a site's local state and the centralized run all go
through it (tiny random-init models; no training: the writer is what is under test)."""
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.numpy import load_file

import shared_models.checkpoint as writer
from client import federated
from server.checkpoints import load_latest_valid, save_round
from shared_models.checkpoint import (CheckpointError, hashed_tensors_bytes, read_hashed_tensors, read_verified,
                                      write_atomic, write_folder)
from shared_models.config import compose
from simulations import centralized

FAST = ["model.image.img_size=64", "model.image.kwargs.depth=1", "model.text.max_length=48",
        "model.text.tokenizer.num_reports=300", "objective=clip"]


def flip_byte(path, position=-1):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def written(monkeypatch):
    """The paths written through `write_atomic`, in order (the writer itself still runs)."""
    paths = []
    real = writer.write_atomic
    assert federated.write_atomic is real   # the site imports the writer itself, not a copy

    def recording(path, data):
        paths.append(str(path))
        return real(path, data)

    for module in (writer, federated):
        monkeypatch.setattr(module, "write_atomic", recording)
    return paths


@pytest.mark.parametrize("existing", [True, False])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, existing):
    path = tmp_path / "state" / "model.safetensors"
    if existing:
        write_atomic(path, b"old complete file")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.os, "fsync", disk_full)   # the data is in the temporary, not yet durable
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new file that never lands")
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == (["model.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old complete file"


def test_a_failed_file_in_a_folder_leaves_no_meta_json(tmp_path, monkeypatch):
    """meta.json marks a complete folder: when a file before it fails, no meta.json claims the folder whole."""
    real = writer.write_atomic

    def second_file_fails(path, data):
        if path.name == "b.bin":
            raise OSError(5, "Input/output error")
        return real(path, data)

    monkeypatch.setattr(writer, "write_atomic", second_file_fails)
    with pytest.raises(OSError, match="Input/output"):
        write_folder(tmp_path / "folder", {"a.bin": b"a", "b.bin": b"b"}, {"round": 1})
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["a.bin"]


def test_the_hash_is_returned_recorded_and_checked_on_read(tmp_path):
    meta = write_folder(tmp_path / "folder", {"a.bin": b"alpha", "b.bin": b"beta"}, {"step": 3})
    on_disk = json.loads((tmp_path / "folder" / "meta.json").read_text())
    assert on_disk == meta and meta["step"] == 3
    assert meta["sha256"] == {"a.bin": writer.sha256(b"alpha"), "b.bin": writer.sha256(b"beta")}
    assert read_verified(tmp_path / "folder" / "a.bin", meta["sha256"]["a.bin"]) == b"alpha"

    flip_byte(tmp_path / "folder" / "a.bin", 0)
    with pytest.raises(CheckpointError, match=r"a\.bin has sha256 .* truncated or altered"):
        read_verified(tmp_path / "folder" / "a.bin", meta["sha256"]["a.bin"])
    with pytest.raises(CheckpointError, match="missing"):
        read_verified(tmp_path / "folder" / "gone.bin", meta["sha256"]["a.bin"])


def test_a_self_hashed_tensor_file_refuses_a_flipped_byte_and_stays_plain_safetensors(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([7], dtype=np.int64)}
    path = tmp_path / "local.safetensors"
    write_atomic(path, hashed_tensors_bytes(arrays, note="kept"))
    plain = load_file(path)                     # any safetensors reader loads it: the format is unchanged
    assert all(np.array_equal(plain[k], arrays[k]) for k in arrays)
    loaded, notes = read_hashed_tensors(path)
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays) and notes["note"] == "kept"

    flip_byte(path)                             # the last byte of the last tensor's data
    with pytest.raises(CheckpointError, match="truncated or altered"):
        read_hashed_tensors(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        read_hashed_tensors(path)


def test_server_rounds_go_through_the_writer_and_a_flipped_byte_falls_back(tmp_path, written, caplog):
    for round_ in (1, 2):
        save_round(tmp_path, round_, {"w": np.full(4, round_, np.float32)}, {"run": "r"},
                   server_state={"m.w": np.ones(4)})
    assert {f"checkpoints/round_0002/{name}" for name in ("model.safetensors", "server_state.safetensors", "meta.json")} \
        | {f"checkpoint/{name}" for name in ("model.safetensors", "meta.json")} \
        <= {str(Path(p).relative_to(tmp_path)) for p in written}
    assert written[-1].endswith("checkpoint/meta.json")   # the latest copy's meta.json goes last

    flip_byte(tmp_path / "checkpoints" / "round_0002" / "server_state.safetensors", 100)
    with caplog.at_level(logging.ERROR):
        latest = load_latest_valid(tmp_path)
    assert latest.round == 1 and latest.params["w"][0] == 1
    assert "server_state.safetensors has sha256" in caplog.text and "truncated or altered" in caplog.text


def test_site_local_state_goes_through_the_writer_and_is_verified(tmp_path, written, caplog):
    local_file = tmp_path / "runs" / "r" / "local.safetensors"
    optimizer_file = local_file.with_name(federated.OPTIMIZER_FILE)
    moments = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}
    optimizer_sha256 = federated._save_optimizer_state(optimizer_file, moments)
    federated._save_local_state(local_file, {"head.w": np.full(3, 2.0, np.float32)}, optimizer_sha256)
    assert written == [str(optimizer_file), str(local_file)]

    local, notes = federated._read_local_state(local_file)
    assert np.array_equal(local["head.w"], np.full(3, 2.0, np.float32))
    restored = federated._load_optimizer_state(optimizer_file, notes[federated.OPTIMIZER_FILE])
    assert float(restored["state"][0]["step"]) == 4.0
    assert federated._read_local_state(tmp_path / "runs" / "new" / "local.safetensors") == ({}, {})

    # a round that stopped between the two writes: the moments are not the ones local.safetensors records
    federated._save_optimizer_state(optimizer_file, {"state": {}, "param_groups": []})
    with caplog.at_level(logging.WARNING):
        assert federated._load_optimizer_state(optimizer_file, notes[federated.OPTIMIZER_FILE]) is None
    assert "truncated or altered" in caplog.text and "zero moments" in caplog.text

    flip_byte(local_file)
    with pytest.raises(CheckpointError, match=r"truncated or altered.*remove .*runs/r to restart them"):
        federated._read_local_state(local_file)


def test_centralized_checkpoint_hashes_its_optimizer_state(tmp_path, monkeypatch, written):
    cfg = compose([*FAST, "train.steps=3"])
    moments = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), 0.5)}},
               "param_groups": [{"lr": 1e-3, "params": [0]}]}

    def no_training(model, dataset, collate_fn, settings, **kwargs):   # the checkpoint is under test, not training
        return SimpleNamespace(steps=settings.steps, seconds=1.0, images_per_s=4.0, loss_start={"loss": 1.0},
                               loss_end={"loss": 0.5}, history=[], optimizer_state=moments)

    monkeypatch.setattr(centralized, "train_steps", no_training)
    centralized.train_centralized(cfg, tmp_path, dataset=[None] * 4)
    folder = tmp_path / "checkpoint"
    assert {str(folder / name) for name in ("model.safetensors", "optimizer.pt", "meta.json")} <= set(written)
    assert written[-1] == str(folder / "meta.json")
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "optimizer.pt"} and meta["step"] == 3

    resumed = OmegaConf.merge(cfg, {"train": {"resume_from": str(folder), "steps": 6}})
    _, step, optimizer_state = centralized.start_model(resumed)
    assert step == 3 and torch.equal(optimizer_state["state"][0]["exp_avg"], torch.full((2,), 0.5))

    flip_byte(folder / "optimizer.pt", 40)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt has sha256 .* truncated or altered"):
        centralized.start_model(resumed)
