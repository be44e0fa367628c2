"""Share of the device's reachable peak that a training step gets, and where the rest goes: `resnet50_bert` (the
papers' model), `tiny_cnn_half` as `make simulate` trains it and `tiny_cnn` (the DP sweep's), whose small
convolutions and heads are where overhead shows."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import all_terms_step, build, make_batch, synchronize
from client.trainer import build_optimizer

MODEL, OBJECTIVE, BATCH_SIZE = "resnet50_bert", "hybrid", 8
# name -> (model, batch size, overrides): the small models as their runs train them
SMALL_MODELS = {
    "tiny_cnn_half": ("tiny_cnn_half", 16, ["+recipe=cpu_quick"]),   # make simulate's model, batch and heads
    "tiny_cnn": ("tiny_cnn", 16, []),                                # the privacy sweep's
}
MATMUL_SIZE = 2048      # fp32, 17 GFLOP: long enough to time, large enough to reach the BLAS peak
COMPONENTS = ("image_encoder", "text_encoder")   # the rest of the forward is the objectives' heads

# Profiler op names -> the kind of work they are; the first matching fragment wins.
OP_KINDS = {
    "matmul_conv": ("conv", "mm", "addmm", "bmm", "linear", "matmul", "baddbmm", "scaled_dot_product", "einsum"),
    "normalization": ("norm",),
    "data_movement": ("copy", "cat", "index", "gather", "scatter", "clone", "contiguous", "pad", "stack",
                      "transpose", "permute"),
}


def matmul_flops_per_s(device: torch.device, size: int = MATMUL_SIZE) -> float:
    """FLOP/s of one size x size fp32 matrix product (2 n^3 FLOPs)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    synchronize()
    started = time.perf_counter()
    torch.mm(a, b)
    synchronize()
    return 2 * size ** 3 / (time.perf_counter() - started)


def op_kind(name: str) -> str:
    name = name.removeprefix("aten::").lower()
    for kind, fragments in OP_KINDS.items():
        if any(fragment in name for fragment in fragments):
            return kind
    return "elementwise_other"


class ComponentTimer:
    """Forward wall time of each named submodule, summed over its calls (the text encoder runs several times)."""

    def __init__(self, model: torch.nn.Module, names=COMPONENTS):
        self.seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        for name in names:
            module = getattr(model, name)
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self._open: dict[str, float] = {}

    def _start(self, name):
        def hook(*_):
            synchronize()
            self._open[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(*_):
            synchronize()
            self.seconds[name] += time.perf_counter() - self._open.pop(name)
        return hook

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def objectives_seconds(forward_s: list[float], components: list[dict[str, float]]) -> float:
    """Median over repeats of the forward time the encoders leave over, taken within each repeat.

    A residual of separate medians would subtract the encoders' times of other repeats: on a shared
    machine that drift can exceed the objectives' own small share of the forward.
    """
    return max(0.0, statistics.median(f - sum(c.get(name, 0.0) for name in COMPONENTS)
                                      for f, c in zip(forward_s, components, strict=True)))


def phased_step(model, optimizer, batch, step: int) -> dict[str, float]:
    """One training step, timed by phase."""
    times = {}
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch, step=step)["loss"]
    synchronize()
    times["forward"] = time.perf_counter() - started
    mark = time.perf_counter()
    loss.backward()
    synchronize()
    times["backward"] = time.perf_counter() - mark
    mark = time.perf_counter()
    optimizer.step()
    synchronize()
    times["optimizer"] = time.perf_counter() - mark
    times["step"] = time.perf_counter() - started
    return times


def count_flops(model, batch, step: int) -> tuple[float, float, dict[str, float]]:
    """(forward FLOPs, backward FLOPs, forward FLOPs per component) of one step, counted by torch."""
    with FlopCounterMode(display=False) as forward:
        loss = model(batch, step=step)["loss"]
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_module = forward.get_flop_counts()
    prefix = type(model).__name__
    components = {name: float(sum(by_module.get(f"{prefix}.{name}", {}).values())) for name in COMPONENTS}
    total_forward = float(forward.get_total_flops())
    components["objectives"] = total_forward - sum(components.values())
    return total_forward, float(backward.get_total_flops()), components


def time_by_op_kind(model, batch, step: int) -> dict[str, float]:
    """Share of one forward + backward's operator self time per kind of work (from the torch profiler).

    The optimizer is left out: its time is measured as a phase, and its per-parameter arithmetic would
    otherwise be indistinguishable from the model's elementwise ops.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        model(batch, step=step)["loss"].backward()
        synchronize()
    model.zero_grad(set_to_none=True)
    device_time = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        totals[op_kind(event.key)] += getattr(event, device_time)
    grand = sum(totals.values()) or 1.0
    return {kind: round(value / grand, 4) for kind, value in sorted(totals.items(), key=lambda kv: -kv[1])}


def run(quick: bool = False) -> dict:
    """`resnet50_bert`'s figures at the top level (as earlier runs wrote them), the small models' under `models`."""
    return {**measure(MODEL, BATCH_SIZE, quick),
            "models": {name: measure(model, batch_size, quick, overrides)
                       for name, (model, batch_size, overrides) in SMALL_MODELS.items()}}


def measure(model_name: str, batch_size: int, quick: bool = False, overrides: list[str] | None = None) -> dict:
    repeats = 2 if quick else 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model = build(model_name, OBJECTIVE, overrides)
    model.to(device).train()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_batch(model, cfg, batch_size).items()}
    step = all_terms_step(cfg)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)

    phased_step(model, optimizer, batch, step)   # warm-up: allocations, the tag queries' first refresh
    forward_flops, backward_flops, component_flops = count_flops(model, batch, step)
    step_flops = forward_flops + backward_flops

    # Training steps and matrix products alternate, so both see the same load on a shared machine.
    timer = ComponentTimer(model)
    steps, matmuls, components = [], [], []
    for _ in range(repeats):
        timer.reset()
        steps.append(phased_step(model, optimizer, batch, step))
        components.append(dict(timer.seconds))
        matmuls.append(max(matmul_flops_per_s(device) for _ in range(3)))
    timer.remove()
    op_shares = time_by_op_kind(model, batch, step)

    step_s = statistics.median(s["step"] for s in steps)
    phases = {phase: round(statistics.median(s[phase] for s in steps), 4)
              for phase in ("forward", "backward", "optimizer")}
    component_s = {name: statistics.median(c.get(name, 0.0) for c in components) for name in COMPONENTS}
    component_s["objectives"] = objectives_seconds([s["forward"] for s in steps], components)
    peak = statistics.median(matmuls)
    train = step_flops / step_s
    # ratio = (share of the step in forward + backward) x (share of that in dense kernels) x (their
    # FLOP/s over the matmul's): every counted FLOP is a matmul or convolution.
    forward_backward_s = phases["forward"] + phases["backward"]
    dense_s = op_shares.get("matmul_conv", 0.0) * forward_backward_s
    return {
        "train_flops_per_s": round(train),
        "matmul_flops_per_s": round(peak),
        "ratio": round(train / peak, 4),
        "model": model_name, "objective": OBJECTIVE, "overrides": list(overrides or []), "batch_size": batch_size,
        "image_size": int(cfg.model.image.img_size), "matmul_size": MATMUL_SIZE, "device": device.type,
        "step_flops": step_flops, "forward_flops": forward_flops, "backward_flops": backward_flops,
        "step_s": round(step_s, 4),
        "phases_s": phases,
        "forward_by_component": {
            name: {"flops": component_flops[name], "seconds": round(component_s[name], 4),
                   "ratio": round(component_flops[name] / component_s[name] / peak, 4) if component_s[name] else None}
            for name in component_flops},
        "time_share_by_op_kind": op_shares,
        "ratio_factors": {
            "forward_backward_share_of_step": round(forward_backward_s / step_s, 4),
            "dense_share_of_forward_backward": op_shares.get("matmul_conv", 0.0),
            "dense_kernels_over_matmul": round(step_flops / dense_s / peak, 4) if dense_s else None,
        },
        "repeats": repeats,
    }
