"""The summed clipped gradient of one Poisson batch, whose add/remove-one-patient sensitivity docs/privacy.md proves."""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

# Terms whose value for one study depends on the other studies of the batch (in-batch negatives, soft
# targets from the other studies' tags). Every other term of the hybrid objective is a function of one
# study alone when the model runs on a batch of that study only.
COUPLED_TERMS = frozenset({"global", "global_impression", "soft_label"})


class TrainableModel(Protocol):
    """What DP-SGD needs of a model: weighted loss terms (`lambdas`), their schedule, and `forward(batch, step)`."""

    lambdas: dict[str, float]

    def active_terms(self, step: int) -> list[str]: ...
    def __call__(self, batch: dict, step: int) -> dict[str, Tensor]: ...


class PrivacyError(ValueError):
    """The model or settings cannot be trained under DP as configured."""


@dataclass(frozen=True)
class ClipNorms:
    """C for each patient's gradient of its per-patient terms, C_b for the coupled terms' batch gradient."""

    patient: float
    coupled: float

    def __post_init__(self):
        if not (self.patient > 0 and self.coupled > 0):
            raise PrivacyError(f"clip norms must be > 0, got max_grad_norm={self.patient}, "
                               f"coupled_max_grad_norm={self.coupled}")

    @property
    def sensitivity(self) -> float:
        """L2 change of `clipped_gradient_sum` when one patient is added or removed: C + 2 C_b."""
        return self.patient + 2.0 * self.coupled


def require_group_norm(model: nn.Module) -> None:
    """Refuse BatchNorm: its batch statistics mix patients in the forward pass (and its running stats leak)."""
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise PrivacyError(
            f"DP-SGD cannot train a model with BatchNorm ({len(batch_norms)} layer(s), e.g. {batch_norms[0]!r}): "
            "it mixes patients inside a batch. The norm layer type is a federation-wide model choice: start the "
            f"federation with {_batch_norm_remedy(batch_norms)}"
        )


def _batch_norm_remedy(batch_norm_names: list[str]) -> str:
    fixes = []
    if any(name.startswith("image_encoder.") for name in batch_norm_names):
        fixes.append("model.image.norm=group")
    if any(name.split(".")[0] in ("image_projection", "text_projection") for name in batch_norm_names):
        fixes.append("model.projection_head=linear")
    # The privacy=dpsgd* presets set both; a command line or model file that sets them back lands here.
    return " and ".join(fixes) or "model.image.norm=group and model.projection_head=linear"


@contextmanager
def only_terms(model: TrainableModel, terms: set[str]) -> Iterator[list[str]]:
    """Let `model` compute only `terms` (weights unchanged); yields those of them that are weighted."""
    saved = model.lambdas
    model.lambdas = {term: weight for term, weight in saved.items() if term in terms}
    try:
        yield list(model.lambdas)
    finally:
        model.lambdas = saved


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_gradient(model: TrainableModel, batch: dict, step: int, params: Sequence[nn.Parameter],
                  autocast: Callable[[], object]) -> tuple[list[Tensor], dict[str, float]]:
    """Gradient of the model's weighted loss on `batch` w.r.t. `params` (zeros where unused), and its terms."""
    with autocast():
        out = model(batch, step=step)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}: { {k: float(v) for k, v in out.items()} }")
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)]
    return grads, {name: float(value.detach()) for name, value in out.items()}


def clip_(grads: list[Tensor], max_norm: float) -> float:
    """Scale `grads` in place so their joint L2 norm is at most max_norm; returns the norm before."""
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if not math.isfinite(norm):  # a NaN would pass any clip and void the sensitivity bound
        raise FloatingPointError(f"non-finite gradient norm {norm}; lower train.lr or check the data")
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


@dataclass
class ClippedSum:
    gradient: list[Tensor]              # S(B), one tensor per trainable parameter
    terms: dict[str, float]             # loss terms for the site's own log (data-derived: never sent)
    clipped_patients: int               # patients whose gradient was scaled down (site's log only)


def clipped_gradient_sum(
    model: TrainableModel,
    samples: list[dict],
    collate_fn: Callable[[list[dict]], dict],
    step: int,
    clip: ClipNorms,
    coupled_scale: float,
    params: Sequence[nn.Parameter] | None = None,
    move: Callable[[dict], dict] = lambda batch: batch,
    autocast: Callable[[], object] = nullcontext,
) -> ClippedSum:
    """S(B) = sum over patients of clip_C(grad of its per-patient terms on a batch of that study alone)
             + clip_{C_b}(coupled_scale * grad of the coupled terms on the whole batch).

    Adding or removing one patient changes S(B) by at most `clip.sensitivity` (docs/privacy.md, Lemma 1),
    whatever the terms compute: the proof uses only that each per-patient summand sees one study, and that
    the coupled part is one vector clipped as a whole. `coupled_scale` is a public constant (the expected
    batch size) so that, unclipped, the coupled terms weigh as much as without DP.
    """
    params = list(params) if params is not None else trainable_parameters(model)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    terms: dict[str, float] = {}
    clipped = 0
    step_terms = set(model.active_terms(step))

    with only_terms(model, (step_terms - COUPLED_TERMS)) as per_patient:
        if per_patient:
            sums: dict[str, float] = {}
            for sample in samples:
                grads, values = loss_gradient(model, move(collate_fn([sample])), step, params, autocast)
                clipped += clip_(grads, clip.patient) > clip.patient
                for acc, g in zip(total, grads):
                    acc.add_(g)
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
            terms.update({name: value / max(1, len(samples)) for name, value in sums.items()})

    # With fewer than two studies there are no negatives: the coupled terms are 0 with a 0 gradient.
    with only_terms(model, step_terms & COUPLED_TERMS) as coupled:
        if coupled and len(samples) >= 2:
            grads, values = loss_gradient(model, move(collate_fn(samples)), step, params, autocast)
            for g in grads:
                g.mul_(coupled_scale)
            clip_(grads, clip.coupled)
            for acc, g in zip(total, grads):
                acc.add_(g)
            terms.update({name: value for name, value in values.items() if name != "loss"})
    terms["loss"] = sum(model.lambdas[t] * terms[t] for t in step_terms if t in terms)
    return ClippedSum(total, terms, int(clipped))
