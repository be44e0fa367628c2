"""`python -m simulations.centralized`: pre-train on the pooled data — the yardstick for every federated run."""
from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from client import distributed
from client.data.dataset import CxrDataset
from client.data.transforms import augmentation_settings
from client.trainer import TrainSettings, train_steps
from shared_models.batch import collate
from shared_models.checkpoint import load_checkpoint, read_verified, save_checkpoint
from shared_models.config import config_hash, hydra_entry
from shared_models.factory import create_model
from shared_models.model import schedule_notice, terms_never_trained
from simulations.data import prepare_data

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


OPTIMIZER_FILE = "optimizer.pt"  # beside the checkpoint's files, hashed in its meta.json: AdamW moments for resuming


def start_model(cfg: DictConfig) -> tuple[torch.nn.Module, int, dict | None]:
    """A fresh model at step 0, or the `train.resume_from` checkpoint's model, step and optimizer state."""
    folder = cfg.train.get("resume_from")
    if not folder:
        return create_model(cfg), 0, None
    model, meta = load_checkpoint(folder)
    for section in ("model", "objective"):
        if meta["fingerprints"].get(section) != config_hash(cfg[section]):
            raise ValueError(f"train.resume_from={folder} was trained with another `{section}` config than this run's; "
                             f"resume with the same {section}= overrides (see its meta.json)")
    if meta.get("step") is None:
        raise ValueError(f"train.resume_from={folder} has no step in meta.json (a federated checkpoint?); "
                         "resume only from a centralized run's checkpoint/")
    optimizer_file = Path(folder) / OPTIMIZER_FILE
    optimizer_state = None
    if optimizer_file.is_file():  # a damaged one is refused (CheckpointError): deleting it restarts the moments
        data = read_verified(optimizer_file, meta.get("sha256", {}).get(OPTIMIZER_FILE))
        optimizer_state = torch.load(io.BytesIO(data), weights_only=True)
    if optimizer_state is None:
        log.warning("%s is missing: AdamW restarts its moments from zero", optimizer_file)
    return model, int(meta["step"]), optimizer_state


def train_centralized(cfg: DictConfig, run_dir: Path, dataset: CxrDataset | None = None, steps: int | None = None) -> dict:
    """Train `cfg.model` with `cfg.objective` on the pooled training split; checkpoint + summary in run_dir.

    `train.steps` (or `steps`) is the schedule's total; a run resumed from a checkpoint at step k trains
    the remaining steps - k with the same cosine schedule and objective schedules.
    """
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    torch.manual_seed(cfg.seed)
    if dataset is None:
        data = prepare_data(cfg.data)
        dataset = CxrDataset(data.catalog, data.cache, split="train",
                             image_size=cfg.train.image_size or cfg.model.image.img_size,
                             augmentation=augmentation_settings(cfg.train))
    nproc = int(cfg.train.get("nproc") or 1)
    if nproc > 1 and not distributed.is_distributed():  # the data is ready: N ranks train it (docs/scale.md)
        TrainSettings.from_config(cfg.train, seed=cfg.seed)  # bad settings stop here, before N workers start
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # workers have no Hydra
        return distributed.run(train_centralized, (resolved, run_dir, dataset, steps), nproc, run_id="centralized")
    model, start_step, optimizer_state = start_model(cfg)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed, **({"steps": steps} if steps else {}))
    if start_step >= settings.steps:
        raise ValueError(f"train.resume_from is at step {start_step}, not before train.steps={settings.steps}; "
                         "raise train.steps to train further")
    settings = replace(settings, start_step=start_step, steps=settings.steps - start_step, total_steps=settings.steps)
    model.plan_schedule(settings.total_steps)   # the objective's fractions are of this run's steps
    notice = schedule_notice(cfg.objective, settings.total_steps, "the centralized run")
    if notice:
        log.warning(notice)
    max_length = cfg.train.max_text_length or cfg.model.text.max_length
    log.info("centralized: %d images, steps %d..%d of %s / %s", len(dataset), start_step, settings.total_steps,
             cfg.model.name, cfg.objective.name)
    result = train_steps(model, dataset, partial(collate, tokenizer=model.tokenizer, max_length=max_length),
                         settings, device=pick_device(), description="centralized", optimizer_state=optimizer_state)
    if not distributed.is_main():
        return {}
    moments = io.BytesIO()
    torch.save(result.optimizer_state, moments)
    save_checkpoint(run_dir / "checkpoint", model, cfg, step=settings.total_steps,
                    extra_files={OPTIMIZER_FILE: moments.getvalue()})
    summary = {
        "steps": result.steps,
        "start_step": start_step,
        "seconds": round(result.seconds, 3),
        "examples_per_s": round(result.images_per_s, 3),   # the contract's key: images per second
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "images": len(dataset),
        "terms_never_trained": terms_never_trained(cfg.objective, settings.total_steps),
        # every step's loss terms: the simulation report's per-term curves of the baseline
        "loss_history": [{k: round(v, 5) for k, v in row.items() if k != "lr"} for row in result.history],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = train_centralized(cfg, run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"centralized {cfg.objective.name} on {cfg.model.name}: {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['examples_per_s']:.1f} images/s)")
    for term in summary["loss_end"]:
        print(f"  {term:<18} {summary['loss_start'].get(term, float('nan')):8.4f} -> {summary['loss_end'][term]:8.4f}")
    print(f"checkpoint: {run_dir / 'checkpoint'}")


if __name__ == "__main__":
    hydra_entry("centralized", main)
