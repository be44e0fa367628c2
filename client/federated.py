"""One site's part of a round, without Flower: shared parameters in, locally trained shared parameters out.

The ClientApp calls `initial_shared` and `train_round`; everything else here is what they need:
which parameters travel, and the local-only parameters kept on the site's disk between rounds.

STAND-IN: `_StandInModel` and `_synthetic_dataset` are placeholders for the real pre-training model
(shared_models) and the site's catalog-backed dataset (client.data.dataset); `_build` is the one
place to swap them for the real ones. The training loop already is the real `client.trainer`.
"""
from __future__ import annotations

import fnmatch
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import nn
from torch.utils.data import TensorDataset

from client.trainer import TrainSettings, train_steps

Params = dict[str, np.ndarray]


def is_shared(name: str, shared_patterns: list[str], norm_patterns: list[str], fedbn: bool) -> bool:
    """Whether parameter `name` travels: it matches a shared pattern and is not a norm layer under FedBN."""
    if not any(fnmatch.fnmatchcase(name, p) for p in shared_patterns):
        return False
    return not (fedbn and any(fnmatch.fnmatchcase(name, p) for p in norm_patterns))


def split_state(state: dict[str, torch.Tensor], round_config: dict) -> tuple[Params, Params]:
    """(shared, local-only) numpy copies of a model's state dict, by the round's sharing rule."""
    shared, local = {}, {}
    for name, tensor in state.items():
        travels = is_shared(name, list(round_config["shared_patterns"]), list(round_config["norm_patterns"]),
                            bool(round_config["fedbn"]))
        (shared if travels else local)[name] = tensor.detach().cpu().numpy().copy()
    return shared, local


class _StandInModel(nn.Module):
    """STAND-IN for the pre-training model: an encoder + projection that travel, a decoder that stays."""

    def __init__(self, in_dim: int = 16, width: int = 8, embed: int = 4):
        super().__init__()
        self.image_encoder = nn.Sequential()
        self.image_encoder.add_module("fc", nn.Linear(in_dim, width))
        self.image_encoder.add_module("norm", nn.BatchNorm1d(width))
        self.image_projection = nn.Linear(width, embed)
        self.decoder = nn.Linear(embed, in_dim)

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        x = batch["images"]
        z = self.image_projection(torch.relu(self.image_encoder(x)))
        reconstruction = nn.functional.mse_loss(self.decoder(z), x)
        return {"loss": reconstruction, "reconstruction": reconstruction}


def _synthetic_dataset(site_name: str, seed: int) -> TensorDataset:
    """STAND-IN for the site's dataset: a site-specific number of random vectors, fixed per (site, seed)."""
    generator = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(site_name.encode()) % 1000)
    size = 12 + zlib.crc32(site_name.encode()) % 13
    return TensorDataset(torch.randn(size, 16, generator=generator))


def _collate(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"images": torch.stack([row[0] for row in rows])}


def _build(round_config: dict, site: dict) -> tuple[nn.Module, TensorDataset]:
    """The model (identically initialised at every site by the run's seed) and this site's data."""
    torch.manual_seed(int(round_config["seed"]))
    return _StandInModel(), _synthetic_dataset(site["name"], int(round_config["seed"]))


def _local_file(site: dict, run_id: str) -> Path:
    return Path(site["state_dir"]) / "runs" / run_id / "local.safetensors"


def _save_atomic(path: Path, params: Params) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(save({k: np.ascontiguousarray(v) for k, v in params.items()}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def initial_shared(round_config: dict, site: dict) -> Params:
    """The freshly initialised shared parameters (from the run's seed; no data is touched)."""
    model, _ = _build(round_config, site)
    return split_state(model.state_dict(), round_config)[0]


def train_round(shared: Params, round_config: dict, site: dict, run_id: str) -> tuple[Params, int, dict[str, float]]:
    """Train locally from the global shared parameters; returns (new shared parameters, examples, scalar metrics).

    Local-only parameters are restored from and saved to the site's disk, keyed by `run_id`.
    """
    model, dataset = _build(round_config, site)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    local_file = _local_file(site, run_id)
    if local_file.is_file():
        state.update({k: torch.from_numpy(v) for k, v in load_file(local_file).items()})
    state.update({k: torch.from_numpy(np.array(v)) for k, v in shared.items()})
    model.load_state_dict(state)

    steps = int(round_config["local_steps"])
    settings = TrainSettings(
        steps=steps,
        batch_size=int(round_config.get("batch_size", 8)),
        lr=float(round_config["lr"]),
        warmup_steps=0,
        amp=False,
        seed=int(round_config["seed"]),
        start_step=(int(round_config["round"]) - 1) * steps,
        total_steps=int(round_config["rounds"]) * steps,
        proximal_mu=float(round_config.get("proximal_mu", 0.0)),
    )
    anchor = {k: torch.from_numpy(np.array(v)) for k, v in shared.items()}
    result = train_steps(model, dataset, _collate, settings, device=site.get("device", "cpu"),
                         proximal_anchor=anchor, progress=False, description=f"site {site['name']}")

    new_shared, local = split_state(model.state_dict(), round_config)
    _save_atomic(local_file, local)
    metrics = {name: float(value) for name, value in result.loss_end.items()}  # every loss term, and lr
    metrics.update(steps=float(result.steps), seconds=float(result.seconds))
    return new_shared, len(dataset), metrics
