"""One site's local training on N processes with torch.distributed: the elastic launch torchrun runs, a
patient-disjoint shard per rank, DistributedDataParallel, and the contrastive terms' negatives gathered
from every rank (NCCL on CUDA, gloo on CPU). Flower federates sites; inside a site this is the engine."""
from __future__ import annotations

import logging
import os
import random
import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from shared_models.objectives import GlobalContrastive, SoftLabelContrastive

log = logging.getLogger(__name__)


# -- where this process stands -------------------------------------------------------------------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, checkpoints and reports."""
    return rank() == 0


# -- the worker group ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(entry: Callable, args: Sequence, nproc: int, run_id: str = "fedcxr") -> Any:
    """Run `entry(*args)` on `nproc` local workers under torch's elastic agent (what `torchrun --standalone
    --nproc-per-node N` starts) and return rank 0's result. `entry` must be importable (workers are spawned).

    The agent gives each worker RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a worker that fails stops the
    group and its traceback comes back in the raised ChildFailedError."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"train.nproc must be at least 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"train.nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA devices; "
                         "run one process per GPU")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id, rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, monitor_interval=0.2, start_method="spawn",
    )
    results = elastic_launch(config, _worker)(entry, tuple(args), nproc)
    return results[0]


def _worker(entry: Callable, args: tuple, nproc: int) -> Any:
    """One rank: join the process group, share the cores, run `entry`, leave the group."""
    device = init_process_group()
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))  # N ranks share the cores, not N x all
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs for the group
    try:
        return entry(*args)
    finally:
        dist.destroy_process_group()


def init_process_group() -> torch.device:
    """Join the group the launcher described in the environment; NCCL with one GPU per rank, else gloo."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def training_device() -> torch.device:
    """This rank's device: its own GPU under NCCL, the CPU under gloo or without a group."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0)
    return torch.device("cpu")


# -- the batch-coupled terms -----------------------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order. Backward sums every rank's gradient for this rank's rows: each rank
    computes the same global loss, so the sum is N x the gradient of that loss, and DDP's mean over ranks
    turns it back into exactly the one-process gradient (open_clip's put-the-local-rows-back gather gives
    1/N of it, which would reweight the coupled terms against the per-study ones)."""

    @staticmethod
    def forward(ctx, rows: Tensor, counts: Sequence[int] | None) -> Tensor:
        ctx.counts = counts
        return _all_gather(rows, counts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        if ctx.counts is None:
            return grad.chunk(dist.get_world_size())[dist.get_rank()], None
        start = sum(ctx.counts[:dist.get_rank()])
        return grad[start:start + ctx.counts[dist.get_rank()]], None


def _all_gather(rows: Tensor, counts: Sequence[int] | None) -> Tensor:
    """Every rank's rows in rank order; `counts` (each rank's row count, known to all) lets them differ."""
    if counts is None:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)
    if len(rows) != counts[dist.get_rank()]:
        raise ValueError(f"rank {dist.get_rank()} holds {len(rows)} rows, its share says {counts[dist.get_rank()]}")
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))  # all_gather needs one shape on every rank
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_rows(rows: Tensor, counts: Sequence[int] | None = None) -> Tensor:
    """[B_local, ...] -> [sum of B_local, ...], every rank's rows in rank order; gradients flow to each rank's own
    rows. Without `counts` ranks must hold the same number of rows (the trainer's drop_last shards see to it);
    DP-SGD's shares of a Poisson batch differ by one and pass their sizes."""
    if not is_distributed():
        return rows
    if rows.requires_grad:
        return _GatherRows.apply(rows, counts)
    return _all_gather(rows, counts)


COUPLED_MODULES = (GlobalContrastive, SoftLabelContrastive)  # every positional argument is one row per study


@contextmanager
def gathering(model: nn.Module, gather: Callable[[Tensor], Tensor] = gather_rows) -> Iterator[int]:
    """While open, the contrastive objectives of `model` compute over the global batch: their row arguments
    pass through `gather` first. Yields how many modules it covers; closing restores their own forward."""
    coupled = [m for m in model.modules() if isinstance(m, COUPLED_MODULES)]
    for module in coupled:
        module.forward = _gathered(module.forward, gather)  # an instance attribute: nn.Module calls it
    try:
        yield len(coupled)
    finally:
        for module in coupled:
            del module.forward


def _gathered(forward: Callable, gather: Callable[[Tensor], Tensor]) -> Callable:
    def gathered_forward(*rows: Tensor) -> Tensor:
        return forward(*(gather(r) for r in rows))
    return gathered_forward


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model` (already on `device`); train it inside `gathering(model)`.

    BatchNorm standardises over each rank's rows unless the layers are SyncBatchNorm, which torch runs on
    GPUs only: on CUDA they are converted, on CPU (gloo) a model with BatchNorm trains with per-rank
    statistics, like a 1-process run with a smaller batch for those layers."""
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_batch_norm and is_main():
        log.warning("BatchNorm layers use each rank's rows on CPU (SyncBatchNorm needs GPUs): a %d-process run "
                    "is not the 1-process run for them; model.projection_head=linear and norm=group avoid it",
                    world_size())
    # Objective schedules switch terms on and off, so some parameters are unused at some steps.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The group's mean of each logged term (per-study terms differ per rank; the gathered ones do not)."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    device = training_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    stacked = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(names, (stacked / world_size()).tolist()))


def all_reduce_(tensors: list[Tensor], mean: bool = False) -> list[Tensor]:
    """Sum (or mean) each tensor over the ranks, in place, in one collective; a no-op without a group."""
    if is_distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        if mean:
            flat /= world_size()
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors


def broadcast_(tensors: list[Tensor], src: int = 0) -> list[Tensor]:
    """Overwrite each tensor with rank `src`'s, in place, one collective per dtype; a no-op without a group."""
    if is_distributed():
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t.data for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))
    return tensors


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (pickled: for small things, e.g. a sampled batch's indices)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def contiguous_shares(count: int, world: int) -> list[range]:
    """range(count) cut into `world` consecutive shares whose sizes differ by at most one, in rank order."""
    base, extra = divmod(count, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world)]


# -- the data: each rank its own patients ------------------------------------------------------------------

def patient_ids_of(dataset) -> list[str]:
    ids = getattr(dataset, "patient_ids", None)
    if ids is None:
        ids = [dataset[i]["patient_id"] for i in range(len(dataset))]
    return list(ids)


def patient_shards(patient_ids: Sequence[str], world: int, seed: int) -> list[list[int]]:
    """Deal patients (all their images together) to `world` shards, shuffled by `seed`, each next patient to
    the shard with the fewest images: disjoint patients, image counts within one patient's images of equal."""
    by_patient: dict[str, list[int]] = {}
    for index, patient in enumerate(patient_ids):
        by_patient.setdefault(str(patient), []).append(index)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    patients.sort(key=lambda p: -len(by_patient[p]))  # stable: the shuffle orders patients of one size
    shards: list[list[int]] = [[] for _ in range(world)]
    for patient in patients:
        min(shards, key=len).extend(by_patient[patient])
    return shards


class PatientShardSampler(Sampler[int]):
    """This rank's images (its patients from `patient_shards`), reshuffled on every pass over them."""

    def __init__(self, patient_ids: Sequence[str], rank: int, world: int, seed: int):
        shards = patient_shards(patient_ids, world, seed)
        self.indices, self.smallest = shards[rank], min(len(s) for s in shards)
        self.seed, self.rank, self.passes = seed, rank, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.passes)
        self.passes += 1
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.indices)
