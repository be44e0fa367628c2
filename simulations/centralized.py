"""`python -m simulations.centralized`: pre-train on the pooled data — the yardstick for every federated run."""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from client.data.dataset import CxrDataset
from client.trainer import TrainSettings, train_steps
from shared_models.batch import collate
from shared_models.checkpoint import save_checkpoint
from shared_models.config import hydra_entry
from shared_models.factory import create_model
from simulations.data import prepare_data

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_centralized(cfg: DictConfig, run_dir: Path, dataset: CxrDataset | None = None, steps: int | None = None) -> dict:
    """Train `cfg.model` with `cfg.objective` on the pooled training split; checkpoint + summary in run_dir."""
    torch.manual_seed(cfg.seed)
    if dataset is None:
        data = prepare_data(cfg.data)
        dataset = CxrDataset(data.catalog, data.cache, split="train",
                             image_size=cfg.train.image_size or cfg.model.image.img_size, train=True)
    model = create_model(cfg)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed, **({"steps": steps} if steps else {}))
    max_length = cfg.train.max_text_length or cfg.model.text.max_length
    log.info("centralized: %d images, %d steps of %s / %s", len(dataset), settings.steps, cfg.model.name, cfg.objective.name)
    result = train_steps(model, dataset, partial(collate, tokenizer=model.tokenizer, max_length=max_length),
                         settings, device=pick_device(), description="centralized")
    save_checkpoint(run_dir / "checkpoint", model, cfg, step=settings.steps)
    summary = {
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "examples_per_s": round(result.examples_per_s, 3),
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "images": len(dataset),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = train_centralized(cfg, run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"centralized {cfg.objective.name} on {cfg.model.name}: {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['examples_per_s']:.1f} examples/s)")
    for term in summary["loss_end"]:
        print(f"  {term:<18} {summary['loss_start'].get(term, float('nan')):8.4f} -> {summary['loss_end'][term]:8.4f}")
    print(f"checkpoint: {run_dir / 'checkpoint'}")


if __name__ == "__main__":
    hydra_entry("centralized", main)
