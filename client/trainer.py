"""Local training: k optimizer steps of a pre-training model on a site's data (no Flower here)."""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from client import distributed


@dataclass
class TrainSettings:
    """What one call of `train_steps` needs; built from the Hydra `train` group."""

    steps: int
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    amp: bool = True
    num_workers: int = 0
    nproc: int = 1  # processes (GPUs) of one site; batch_size stays the global batch, split over them
    log_every: int = 10
    seed: int = 0
    # Federated rounds continue one schedule across rounds: the cosine runs over total_steps
    # starting at start_step; the centralized run has start_step 0 and total_steps == steps.
    start_step: int = 0
    total_steps: int | None = None
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 over the shared parameters

    def __post_init__(self):
        if self.nproc < 1 or self.batch_size % self.nproc:
            raise ValueError(f"train.batch_size={self.batch_size} (the global batch) must split evenly over "
                             f"train.nproc={self.nproc} processes (nproc >= 1); use a multiple of nproc")

    @classmethod
    def from_config(cls, train_cfg, **overrides) -> "TrainSettings":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in dict(train_cfg).items() if k in known}
        values.update(overrides)
        return cls(**values)


@dataclass
class TrainResult:
    steps: int
    images: int          # batch rows trained on (one image and its report each; under DP-SGD the patients drawn)
    seconds: float
    loss_start: dict[str, float]
    loss_end: dict[str, float]
    loss_mean: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict | None = None  # AdamW moments, so a resumed run continues where this one stopped

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up then cosine decay to base_lr * min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and other 1-d parameters (as in CLIP/timm).

    Fused (one kernel over all parameters) where torch has that kernel: the same update as the per-tensor loop, in
    a third of the time on CPU (resnet50_bert's 74 M trained parameters: 0.08 s against 0.25 s a step)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        fused=fused or None,
    )


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG a step draws from (dropout, augmentation, shuffling); returns the loader's generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def endless_batches(loader: DataLoader) -> Iterator:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training data set is empty: no study has an ok image and a usable report")


def move_to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def proximal_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_anchor||^2 over the anchored (shared) parameters."""
    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, ref in anchor.items():
        param = params.get(name)
        if param is not None and param.requires_grad:
            total = total + (param - ref.to(param.device)).pow(2).sum()
    return 0.5 * mu * total


TakeStep = Callable[[int], tuple[dict[str, float], int]]
"""One step's gradient at step number `step`, left in the trained parameters' `.grad`; returns the step's loss
terms (for the log) and the batch rows (images) it trained on."""


class StepStrategy(Protocol):
    """How `train_steps` makes each step's gradient; the loop does the rest (lr schedule, clip, AdamW, log).

    `bind` is entered once around all the steps: it checks the settings, sets up what the steps draw from (data,
    seeds, the worker group) and yields the step. `proximal` is FedProx's penalty on the current weights (None
    without one), whose gradient the step adds."""

    def bind(self, model: nn.Module, dataset: Dataset, collate_fn: Callable, settings: TrainSettings,
             device: torch.device, proximal: Callable[[], torch.Tensor] | None,
             ) -> contextlib.AbstractContextManager[TakeStep]: ...


def train_steps(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    proximal_anchor: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    description: str = "train",
    optimizer_state: dict | None = None,
    strategy: StepStrategy | None = None,
) -> TrainResult:
    """Run `settings.steps` optimizer steps; returns per-term loss at start, end and on average.

    Each step's gradient comes from `strategy`: by default `PlainStep` (the loss's gradient on a shuffled
    batch); DP-SGD plugs in `client.privacy.training.PrivateStep`. Step numbers given to the model (its
    objective schedules) continue from `settings.start_step`; `optimizer_state` (a previous
    `TrainResult.optimizer_state`) restores AdamW's moments on resume. Inside a worker group
    (`client.distributed.run`) every rank trains on its own device, and rank 0's history is the group's.
    """
    device = distributed.training_device() if distributed.is_distributed() else torch.device(device)
    model.to(device).train()
    proximal = None
    if proximal_anchor is not None and settings.proximal_mu > 0:
        proximal = partial(proximal_penalty, model, proximal_anchor, settings.proximal_mu)
    strategy = strategy or PlainStep()
    with strategy.bind(model, dataset, collate_fn, settings, device, proximal) as take_step:
        optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        total_steps = settings.total_steps or (settings.start_step + settings.steps)
        progress = progress and distributed.is_main()
        history: list[dict[str, float]] = []
        images = 0
        started = time.perf_counter()
        bar = tqdm(range(settings.steps), desc=description, disable=not progress, leave=False)
        for i in bar:
            step = settings.start_step + i
            lr = cosine_lr(step, total_steps, settings.warmup_steps, settings.lr, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms, used = take_step(step)
            images += used
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], settings.grad_clip
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({**terms, "lr": lr})
            if progress and (i % max(1, settings.log_every) == 0 or i == settings.steps - 1):
                bar.set_postfix(loss=f"{terms['loss']:.3f}")
        seconds = time.perf_counter() - started
    return TrainResult(
        steps=settings.steps,
        images=images,
        seconds=seconds,
        loss_start=_window_mean(history, first=True),
        loss_end=_window_mean(history, first=False),
        loss_mean=_window_mean(history, first=True, window=len(history)),
        history=history,
        optimizer_state=optimizer.state_dict(),
    )


class PlainStep:
    """The non-private step: `grad_accum` micro-batches of the shuffled data, each forward, loss (+ FedProx)
    and backward. In a worker group each rank draws its own patients, augmentation and dropout, and DDP
    (started from rank 0's weights) averages the ranks' gradients: the same step as one process with the
    same global batch."""

    @contextlib.contextmanager
    def bind(self, model: nn.Module, dataset: Dataset, collate_fn: Callable, settings: TrainSettings,
             device: torch.device, proximal: Callable[[], torch.Tensor] | None) -> Iterator[TakeStep]:
        rank, world = distributed.rank(), distributed.world_size()
        if settings.nproc != world:
            raise ValueError(f"train.nproc={settings.nproc} but this process trains in a group of {world}: only "
                             "`python -m simulations.centralized` starts the worker group; a federated site trains "
                             "in one process (docs/scale.md)")
        generator = seed_everything(settings.seed + settings.start_step + 1_000_003 * rank)
        batches = endless_batches(_loader(dataset, collate_fn, settings, generator, rank, world))
        trained = distributed.wrap_model(model, device) if world > 1 else model
        use_amp = settings.amp and device.type == "cuda"

        def take_step(step: int) -> tuple[dict[str, float], int]:
            terms: dict[str, float] = {}
            images = 0
            for micro in range(settings.grad_accum):
                batch = move_to(next(batches), device)
                # DDP all-reduces the gradients once, after the last micro-batch.
                last = micro == settings.grad_accum - 1
                with trained.no_sync() if world > 1 and not last else contextlib.nullcontext():
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        out = trained(batch, step=step)
                    loss = out["loss"] if proximal is None else out["loss"] + proximal()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss at step {step}: { {k: float(v) for k, v in out.items()} }; "
                            "lower train.lr or check the data"
                        )
                    (loss / settings.grad_accum).backward()
                images += int(batch["images"].shape[0]) * world
                for name, value in out.items():
                    terms[name] = terms.get(name, 0.0) + float(value.detach()) / settings.grad_accum
            return distributed.mean_over_ranks(terms), images

        with distributed.gathering(model) if world > 1 else contextlib.nullcontext():
            yield take_step


def _loader(dataset: Dataset, collate_fn: Callable, settings: TrainSettings, generator: torch.Generator,
            rank: int, world: int) -> DataLoader:
    """One process: the whole data set shuffled. N processes: each rank its own patients (`PatientShardSampler`)
    in batches of batch_size / N, full ones only, so that the gathered global batch is batch_size."""
    common = dict(collate_fn=collate_fn, num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0)
    if world == 1:
        return DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                          drop_last=len(dataset) > settings.batch_size, generator=generator, **common)
    local_batch = settings.batch_size // world
    sampler = distributed.PatientShardSampler(distributed.patient_ids_of(dataset), rank, world, settings.seed)
    if sampler.smallest < local_batch:  # every rank sees every shard's size, so all of them stop here
        raise ValueError(f"a rank holds {sampler.smallest} images of its patients, fewer than its batch of "
                         f"{local_batch} (train.batch_size={settings.batch_size} / nproc={world}); lower train.nproc "
                         "or train.batch_size")
    return DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True, **common)


def _window_mean(history: list[dict[str, float]], first: bool, window: int | None = None) -> dict[str, float]:
    """Mean of each term over the first or last few steps (single steps are too noisy to compare)."""
    if not history:
        return {}
    window = window or max(1, min(10, len(history) // 5 or 1))
    rows = history[:window] if first else history[-window:]
    names = {k for row in rows for k in row if k != "lr"}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(names)}
