"""How S(B) is computed on a model, the arithmetic being `client.privacy.clipping`'s: the per-patient summands in one
vmapped pass or one pass per patient (the loop, on CPU on several worker threads), the coupled terms' batch
gradient (from the loop's kept encoder graphs, or a batch pass), each pass restricted to its terms by swapping the
model's `lambdas`, and a worker group's share of the batch. Why each choice: docs/privacy.md, "Per-patient
summands in one pass"."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from client import distributed
from client.privacy.clipping import (
    ClippedSum,
    ClipNorms,
    PrivacyError,
    add_scaled_,
    clip_factor,
    clipped_row_sum,
    split_terms,
)
from client.privacy.disclosure import NonFiniteStep


class TrainableModel(Protocol):
    """What DP-SGD needs of a model: weighted loss terms (`lambdas`), their schedule, and `forward(batch, step)`."""

    lambdas: dict[str, float]

    def active_terms(self, step: int) -> list[str]: ...
    def __call__(self, batch: dict, step: int) -> dict[str, Tensor]: ...


# How the per-patient summands are computed: all studies in one vmapped pass, one pass per patient, or
# whichever is faster for the model's image encoder (`per_study_method`).
PER_STUDY_METHODS = ("auto", "vmap", "loop")


def check_per_study(requested: str) -> None:
    if requested not in PER_STUDY_METHODS:
        raise PrivacyError(f"privacy.dpsgd.per_study={requested!r}; choose one of {list(PER_STUDY_METHODS)}")


def per_study_method(model: nn.Module, requested: str) -> str:
    """`requested`, with "auto" resolved by measurement: vmap for transformer image encoders, the loop for CNNs,
    whose per-study convolution weight gradients vmap computes as grouped convolutions, slower on CPU than a pass
    per patient (the figures: docs/privacy.md, "Per-patient summands in one pass")."""
    if requested != "auto":
        return requested
    encoder = getattr(model, "image_encoder", None)
    return "vmap" if getattr(encoder, "is_transformer", False) else "loop"


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
                  autocast: Callable[[], object], inputs: object | None = None,
                  keep_graph: bool = False) -> tuple[list[Tensor | None], dict[str, float]]:
    """Gradient of the model's weighted loss on `batch` w.r.t. `params` (None where unused), and its terms.

    `inputs`: the encoder outputs the model should use and keep (the model's `step_inputs(batch)`), with
    `keep_graph` so that a later backward can pass through them again."""
    with autocast():
        out = model(batch, step=step) if inputs is None else model(batch, step=step, inputs=inputs)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise NonFiniteStep(step, "loss", {k: float(v) for k, v in out.items()})
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=keep_graph)
    return [None if g is None else g.float() for g in grads], {name: float(value.detach()) for name, value in out.items()}


def per_study_gradients(model: nn.Module, batch: dict, step: int, params: Sequence[nn.Parameter],
                        autocast: Callable[[], object]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Row i of each returned tensor is the gradient of the model's weighted loss on a batch holding study i
    alone (the batch of one that `collate([sample_i])` would give, padded to this batch's widths), computed
    for every study at once with torch.func.vmap; also each study's loss terms [B].

    The function vmap maps sees one study: its value and gradient depend on no other study of the batch
    (docs/privacy.md, "Per-study gradients in one pass"). Padding changes neither but the order of
    floating-point sums."""
    embed_once = getattr(model, "embed_tag_queries_once", None)
    if embed_once is not None:   # here, not in the model's first forward: vmap cannot write a buffer in place
        embed_once()
    names = {id(p): name for name, p in model.named_parameters()}
    weights = {names[id(p)]: p.detach() for p in params}
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    def loss_of_one_study(weights: dict[str, Tensor], study: dict[str, Tensor]):
        one = {k: v.unsqueeze(0) for k, v in study.items()}
        with autocast():
            out = functional_call(model, weights, (one,), {"step": step}, strict=False)
        return out["loss"], {name: value.detach() for name, value in out.items()}

    # randomness="same": dropout draws one mask for every study, independent of the data as DP-SGD needs.
    # The math attention kernel is plain matmul + softmax, which vmap batches; the fused CPU kernels it would
    # run one study at a time.
    with sdpa_kernel(SDPBackend.MATH):
        grads, terms = vmap(grad(loss_of_one_study, has_aux=True), in_dims=(None, 0), randomness="same")(
            weights, tensors)
    return [grads[names[id(p)]].float() for p in params], terms


Item = TypeVar("Item")
Share = TypeVar("Share")


def loop_workers(params: Sequence[Tensor], requested: int | None, studies: int) -> int:
    """How many studies the loop takes at once: on CPU one per intra-op thread (`requested`, default all of
    them), each pass then on one thread; on a GPU one, whose kernels a pass already fills."""
    if params and params[0].device.type != "cpu":
        return 1
    workers = torch.get_num_threads() if requested is None else requested
    if workers < 1:
        raise PrivacyError(f"loop workers must be >= 1, got {workers}")
    return max(1, min(workers, studies))


@contextmanager
def one_thread_per_op() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sum_over_shares(fn: Callable[[list[Item], list[Tensor]], Share], items: list[Item], workers: int,
                    total: list[Tensor]) -> list[Share]:
    """fn(share, into) for each of `workers` fixed shares of items (items[k::workers]), the shares at once on their
    own threads with one intra-op thread each; `fn` adds its share's gradient into `into`, which is `total` for the
    first share and fresh zeros, added to `total` in share order, for the others. Returns fn's results.

    Why: one study's forward/backward keeps several CPU threads busy for only part of its ops, while studies on
    a thread each do (docs/privacy.md, "The loop on several threads"). The shares are fixed, not first come first
    served, so that S(B) is summed in the same order whatever the timing."""
    shares = [items[k::workers] for k in range(workers)]
    intos = [total] + [[torch.zeros_like(t) for t in total] for _ in range(workers - 1)]
    if workers == 1:
        results = [fn(shares[0], total)]
    else:
        with one_thread_per_op(), ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(fn, shares, intos))
    for into in intos[1:]:
        torch._foreach_add_(total, into)
    return results


def coupled_gradient_by_study(model: TrainableModel, stacked, step: int, params: Sequence[nn.Parameter],
                              autocast: Callable[[], object], workers: int) -> tuple[list[Tensor], dict[str, float]]:
    """The coupled terms' batch gradient on `stacked` (the model's StackedInputs) w.r.t. params, and its terms.

    Two backward passes that make one by the chain rule: through the coupled terms to each study's cut embeddings,
    then through each study's encoder graph kept from its per-patient pass, with those embeddings' gradients; the
    studies on `workers` threads (`sum_over_shares`), each study's rows in one pass since its graphs share nodes."""
    with autocast():
        out = model(stacked.batch, step=step, inputs=stacked)
    if not torch.isfinite(out["loss"]):
        raise NonFiniteStep(step, "loss", {k: float(v) for k, v in out.items()})
    leaves = [leaf for _, _, leaf in stacked.cuts]
    grads = torch.autograd.grad(out["loss"], [*params, *leaves], allow_unused=True)
    gradient = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    add_scaled_(gradient, [None if g is None else g.float() for g in grads[:len(params)]], 1.0)
    by_study: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for (index, row, _), leaf_grad in zip(stacked.cuts, grads[len(params):]):
        if leaf_grad is not None:
            by_study.setdefault(index, []).append((row, leaf_grad))

    def through_encoders(share: list[list[tuple[Tensor, Tensor]]], into: list[Tensor]) -> None:
        for rows in share:
            study_grads = torch.autograd.grad([row for row, _ in rows], params, [g for _, g in rows], allow_unused=True)
            add_scaled_(into, [None if g is None else g.float() for g in study_grads], 1.0)

    sum_over_shares(through_encoders, [by_study[i] for i in sorted(by_study)], workers, gradient)
    return gradient, {name: float(value.detach()) for name, value in out.items()}


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
    per_study: str = "auto",
    workers: int | None = None,
    group_counts: Sequence[int] | None = None,
) -> ClippedSum:
    """S(B) = sum over patients of clip_C(grad of its per-patient terms on a batch of that study alone)
             + clip_{C_b}(coupled_scale * grad of the coupled terms on the whole batch).

    Adding or removing one patient changes S(B) by at most `clip.sensitivity` (docs/privacy.md, Lemma 1),
    whatever the terms compute: the proof uses only that each per-patient summand sees one study, and that
    the coupled part is one vector clipped as a whole. `coupled_scale` is a public constant (the expected
    batch size) so that, unclipped, the coupled terms weigh as much as without DP.

    `per_study`: "vmap" computes the per-patient summands for the whole batch in one vmapped pass
    (`per_study_gradients`), "loop" runs one forward/backward per patient; both compute the same summands;
    "auto" picks the faster for the model (`per_study_method`). The loop also keeps each study's encoder outputs
    (a model with `step_inputs`) and takes the coupled terms' batch gradient through them: the same gradient as
    a second forward of the whole batch (the encoders see every study on its own: no BatchNorm), without that
    forward. `workers`: how many studies the loop takes at once on CPU (`loop_workers`; default: one per thread).

    `group_counts`: under a process group, each rank's study count of one global batch (rank order), `samples`
    being this rank's share. The per-patient summands are this rank's, summed over the ranks; the coupled terms
    read every rank's rows (gathered) and their gradient, averaged over the ranks (the gather's backward sums N
    copies), is the global batch's, clipped once as a whole: every rank returns the 1-process S(B).
    """
    check_per_study(per_study)
    per_study = per_study_method(model, per_study)
    params = list(params) if params is not None else trainable_parameters(model)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    terms: dict[str, float] = {}
    clipped = 0
    step_terms = set(model.active_terms(step))
    studies = len(samples) if group_counts is None else sum(group_counts)
    coupled_terms, per_patient_terms = split_terms(step_terms, studies)
    # The loop keeps each study's encoder outputs for the coupled terms (the model's `stacked_inputs`): their
    # batch gradient then needs no second forward of the encoders, only a backward through the kept graphs.
    reuse_encoded = bool(per_study == "loop" and coupled_terms and per_patient_terms
                         and getattr(model, "step_inputs", None))
    workers = loop_workers(params, workers, len(samples))
    encoded = []
    needs_batch = (per_study == "vmap" and per_patient_terms) or (coupled_terms and not reuse_encoded)
    batch = move(collate_fn(samples)) if samples and needs_batch else None

    with only_terms(model, per_patient_terms) as per_patient:
        if per_patient and samples and per_study == "vmap":
            clipped, per_patient_values = _vmapped_summands(model, batch, step, params, autocast, clip.patient, total)
            terms.update(per_patient_values)
        elif per_patient:
            # Collated here, not on the workers: a fast tokenizer is not safe to share between threads.
            one_study_batches = [move(collate_fn([sample])) for sample in samples]
            clipped, per_patient_values, encoded = _looped_summands(
                model, one_study_batches, step, params, autocast, clip.patient, total, workers,
                keep_for=coupled_terms if reuse_encoded else None)
            terms.update(per_patient_values)

    if group_counts is not None:
        distributed.all_reduce_(total)
    gathered = (distributed.gathering(model, partial(distributed.gather_rows, counts=list(group_counts)))
                if group_counts is not None else nullcontext())
    with only_terms(model, coupled_terms) as coupled, gathered as modules:
        if coupled and group_counts is not None and not modules:
            raise PrivacyError(f"coupled terms {sorted(coupled)} on {len(group_counts)} processes, but the model has "
                               "no contrastive objective module to gather the global batch through "
                               "(client.distributed.COUPLED_MODULES): they would see one rank's rows")
        if coupled:
            if encoded:
                grads, values = coupled_gradient_by_study(model, model.stacked_inputs(encoded), step, params,
                                                          autocast, workers)
            else:
                grads, values = loss_gradient(model, batch, step, params, autocast)
            if group_counts is not None:   # every rank's part of the one batch gradient, before its one clip
                dense = [torch.zeros_like(t) for t in total]
                add_scaled_(dense, grads, 1.0)
                grads = distributed.all_reduce_(dense, mean=True)
            factor, _ = clip_factor(grads, clip.coupled, scale=coupled_scale)
            add_scaled_(total, grads, factor)
            terms.update({name: value for name, value in values.items() if name != "loss"})
    terms["loss"] = sum(model.lambdas[t] * terms[t] for t in step_terms if t in terms)
    return ClippedSum(total, terms, int(clipped))


def _vmapped_summands(model: TrainableModel, batch: dict, step: int, params: Sequence[nn.Parameter],
                      autocast: Callable[[], object], max_norm: float,
                      total: list[Tensor]) -> tuple[int, dict[str, float]]:
    """Adds every study's clipped per-patient gradient into `total`, all from one vmapped pass; returns how many
    were clipped and the terms' means."""
    grads, values = per_study_gradients(model, batch, step, params, autocast)
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        raise NonFiniteStep(step, "loss", {k: v.tolist() for k, v in values.items()})
    row_sums, norms = clipped_row_sum(grads, max_norm)
    torch._foreach_add_(total, row_sums)
    return int((norms > max_norm).sum()), {name: float(value.mean()) for name, value in values.items()}


def _looped_summands(model: TrainableModel, studies: list[dict], step: int, params: Sequence[nn.Parameter],
                     autocast: Callable[[], object], max_norm: float, total: list[Tensor], workers: int,
                     keep_for: set[str] | None) -> tuple[int, dict[str, float], list]:
    """Adds every study's clipped per-patient gradient into `total`, one pass per study (batches of one), the
    studies shared over `workers` threads (`sum_over_shares`); returns how many were clipped, the terms' means,
    and, with `keep_for` (coupled terms to come), each study's encoder outputs in batch order with their graphs."""
    embed_once = getattr(model, "embed_tag_queries_once", None)
    if embed_once is not None:   # the model's one write to itself: not on two threads at once
        embed_once()

    def per_patient_share(share: list[tuple[int, dict]], into: list[Tensor]):
        sums: dict[str, float] = {}
        clipped_here, kept = 0, []
        for index, study in share:
            inputs = model.step_inputs(study) if keep_for else None
            grads, values = loss_gradient(model, study, step, params, autocast, inputs, keep_graph=bool(keep_for))
            if keep_for:   # what the coupled terms read but these terms did not, here on this thread
                for row in model.coupled_rows(keep_for):
                    getattr(inputs, row)
                kept.append((index, inputs))
            factor, norm = clip_factor(grads, max_norm)
            clipped_here += norm > max_norm
            add_scaled_(into, grads, factor)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
        return sums, clipped_here, kept

    clipped, sums, encoded = 0, {}, []
    for share_sums, clipped_here, kept in sum_over_shares(per_patient_share, list(enumerate(studies)), workers, total):
        clipped += clipped_here
        encoded += kept
        for name, value in share_sums.items():
            sums[name] = sums.get(name, 0.0) + value
    encoded = [inputs for _, inputs in sorted(encoded, key=lambda kept: kept[0])]
    return clipped, {name: value / max(1, len(studies)) for name, value in sums.items()}, encoded
