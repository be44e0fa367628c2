"""How S(B) is computed on a model, the arithmetic being `client.privacy.clipping`'s: the per-patient summands in one
vmapped pass or one pass per patient (the loop, on CPU on several worker threads), the coupled terms' batch
gradient (from the loop's kept encoder graphs, or a batch pass), each pass restricted to its terms by swapping the
model's `lambdas`, and a worker group's share of the batch. Why each choice: docs/privacy.md, "Per-patient
summands in one pass"."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial
from types import SimpleNamespace
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
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


# How the per-patient summands are computed: all studies in one vmapped pass, one pass per patient, either of them
# with a backward that also carries the coupled terms' cotangent (`_fused`: no separate backward for the coupled
# terms), or whichever is fastest for the model's image encoder (`per_study_method`).
PER_STUDY_METHODS = ("auto", "vmap", "loop", "vmap_fused", "loop_fused")


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


class _RowsFirst(nn.Module):
    """The model's step on a batch, its coupled terms' input rows computed first and returned beside its terms.

    First, in a fixed order: the rows' dropout masks are then the first draws of the generator, the same whether the
    step goes on to the per-patient terms or stops at the rows (`vmapped_fused_gradients` replays the generator)."""

    def __init__(self, model: nn.Module, rows: list[str]):
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, batch: dict, step: int, rows_only: bool = False):
        inputs = self.model.step_inputs(batch)
        rows = {name: getattr(inputs, name) for name in self.rows}
        return rows if rows_only else (self.model(batch, step=step, inputs=inputs), rows)


def vmapped_fused_gradients(model: nn.Module, batch: dict, step: int, params: Sequence[nn.Parameter],
                            autocast: Callable[[], object], per_patient_terms: set[str], coupled_terms: set[str]
                            ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor], dict[str, float]]:
    """`per_study_gradients`' per-study gradients of the per-patient terms [B, ...], and the coupled terms' batch
    gradient grad L_K(B), from one vmapped pass whose backward carries both cotangents; also the per-patient terms
    per study [B] and the coupled terms.

    1. The coupled terms' rows (the studies' embeddings), each study alone, vmapped without gradients.
    2. The coupled terms on those rows: their gradient w.r.t. the rows (v, B rows) and their own parameters.
    3. Per study: one forward, then its graph back once with the cotangents (1 on its per-patient loss, v_k on its
       rows) side by side (a vmap over the vjp): g_k and J_k^T v_k. grad L_K(B) = own parameters' part + sum_k J_k^T v_k.
    Step 3 recomputes the rows of step 1 from the same generator state, rows first (`_RowsFirst`), so that its
    dropout masks, and with them J_k, are the ones v was computed at: the chain rule then holds exactly."""
    embed_once = getattr(model, "embed_tag_queries_once", None)
    if embed_once is not None:   # here: vmap cannot write a buffer in place
        embed_once()
    row_names = model.coupled_rows(coupled_terms)
    wrapper = _RowsFirst(model, row_names)
    names = {id(p): name for name, p in model.named_parameters()}
    weights = {"model." + names[id(p)]: p.detach() for p in params}
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
    devices = sorted({t.device for t in tensors.values() if t.device.type != "cpu"}, key=str)
    generator_states = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])

    def rows_of_one_study(weights: dict[str, Tensor], study: dict[str, Tensor]) -> dict[str, Tensor]:
        with autocast():
            return functional_call(wrapper, weights, ({k: v.unsqueeze(0) for k, v in study.items()}, step),
                                   {"rows_only": True}, strict=False)

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        rows = vmap(rows_of_one_study, in_dims=(None, 0), randomness="same")(weights, tensors)
    leaves = {name: row.squeeze(1).detach().float().requires_grad_() for name, row in rows.items()}
    with only_terms(model, coupled_terms):
        with autocast():
            out = model(batch, step=step, inputs=SimpleNamespace(batch=batch, **leaves))
        if not torch.isfinite(out["loss"]):
            raise NonFiniteStep(step, "loss", {k: float(v) for k, v in out.items()})
        grads = torch.autograd.grad(out["loss"], [*params, *leaves.values()], allow_unused=True)
    coupled = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    add_scaled_(coupled, [None if g is None else g.float() for g in grads[:len(params)]], 1.0)
    cotangents = {name: torch.zeros_like(leaf) if g is None else g
                  for (name, leaf), g in zip(leaves.items(), grads[len(params):])}
    coupled_values = {name: float(value.detach()) for name, value in out.items() if name != "loss"}

    def both_of_one_study(weights: dict[str, Tensor], study: dict[str, Tensor], cotangent: dict[str, Tensor]):
        one = {k: v.unsqueeze(0) for k, v in study.items()}

        def step_of(weights):
            with autocast():
                out, rows = functional_call(wrapper, weights, (one, step), strict=False)
            return (out["loss"], rows), {name: value.detach() for name, value in out.items()}

        (loss, rows), pullback, values = vjp(step_of, weights, has_aux=True)
        seeds = (torch.stack([torch.ones_like(loss), torch.zeros_like(loss)]),
                 {name: torch.stack([torch.zeros_like(row), cotangent[name].unsqueeze(0).to(row.dtype)])
                  for name, row in rows.items()})
        (both,) = vmap(pullback)(seeds)
        return both, values, {name: row.detach() for name, row in rows.items()}

    torch.set_rng_state(generator_states[0])   # step 3 draws step 1's masks again (the docstring)
    for device, state in zip(devices, generator_states[1]):
        torch.cuda.set_rng_state(state, device)
    with only_terms(model, per_patient_terms), sdpa_kernel(SDPBackend.MATH):
        both, values, rows_again = vmap(both_of_one_study, in_dims=(None, 0, 0), randomness="same")(
            weights, tensors, cotangents)
    for name, row in rows.items():   # the replay held: else v_k would be applied to another function's J_k
        if not torch.allclose(rows_again[name].float(), row.float(), rtol=1e-3, atol=1e-3 * float(row.abs().max())):
            raise RuntimeError(f"per_study=vmap_fused: the coupled terms' rows ({name}) came out differently on the "
                               "second pass; the model draws randomness the generator's replay does not reproduce. "
                               "Use per_study=vmap or loop")
    per_patient = [both["model." + names[id(p)]][:, 0].float() for p in params]
    torch._foreach_add_(coupled, [both["model." + names[id(p)]][:, 1].float().sum(0) for p in params])
    return per_patient, coupled, values, coupled_values


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
    for into in intos[1:] if total else ():
        torch._foreach_add_(total, into)
    return results


def coupled_cotangents(model: TrainableModel, stacked, step: int, params: Sequence[nn.Parameter],
                       autocast: Callable[[], object]) -> tuple[list[Tensor], list[list[tuple[Tensor, Tensor]]], dict]:
    """The first half of the coupled terms' batch gradient on `stacked` (the model's StackedInputs): the backward
    through the coupled terms alone, which stops at each study's cut embeddings. Returns the gradient of the
    parameters the terms use after the cut (dense, float32), for each study with a cut (batch order) its
    (embedding, embedding's gradient) pairs, and the terms."""
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
    return gradient, [by_study.get(i, []) for i in range(len(stacked.studies))], \
        {name: float(value.detach()) for name, value in out.items()}


def coupled_gradient_by_study(model: TrainableModel, stacked, step: int, params: Sequence[nn.Parameter],
                              autocast: Callable[[], object], workers: int) -> tuple[list[Tensor], dict[str, float]]:
    """The coupled terms' batch gradient on `stacked` (the model's StackedInputs) w.r.t. params, and its terms.

    Two backward passes that make one by the chain rule: through the coupled terms to each study's cut embeddings
    (`coupled_cotangents`), then through each study's encoder graph kept from its per-patient pass, with those
    embeddings' gradients; the studies on `workers` threads (`sum_over_shares`), each study's rows in one pass since
    its graphs share nodes."""
    gradient, by_study, values = coupled_cotangents(model, stacked, step, params, autocast)

    def through_encoders(share: list[list[tuple[Tensor, Tensor]]], into: list[Tensor]) -> None:
        for rows in share:
            study_grads = torch.autograd.grad([row for row, _ in rows], params, [g for _, g in rows], allow_unused=True)
            add_scaled_(into, [None if g is None else g.float() for g in study_grads], 1.0)

    sum_over_shares(through_encoders, [rows for rows in by_study if rows], workers, gradient)
    return gradient, values


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
    # Fusing needs both kinds of term and one process (under a group the coupled terms read the gathered rows: the
    # unfused way); otherwise the method without it.
    fused = bool(per_study.endswith("_fused") and coupled_terms and per_patient_terms and group_counts is None
                 and getattr(model, "step_inputs", None))
    per_study = per_study.removesuffix("_fused")
    reuse_encoded = bool(per_study == "loop" and coupled_terms and per_patient_terms
                         and getattr(model, "step_inputs", None))
    workers = loop_workers(params, workers, len(samples))
    if fused:
        if per_study == "loop":
            one_study_batches = [move(collate_fn([sample])) for sample in samples]   # here: see the loop below
            clipped, terms = _fused_sum(model, one_study_batches, step, params, autocast, clip, coupled_scale,
                                        per_patient_terms, coupled_terms, total, workers)
        else:
            clipped, terms = _vmapped_fused_sum(model, move(collate_fn(samples)), step, params, autocast, clip,
                                                coupled_scale, per_patient_terms, coupled_terms, total)
        terms["loss"] = sum(model.lambdas[t] * terms[t] for t in step_terms if t in terms)
        return ClippedSum(total, terms, int(clipped))
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


def _fused_sum(model: TrainableModel, studies: list[dict], step: int, params: Sequence[nn.Parameter],
               autocast: Callable[[], object], clip: ClipNorms, coupled_scale: float, per_patient_terms: set[str],
               coupled_terms: set[str], total: list[Tensor], workers: int) -> tuple[int, dict[str, float]]:
    """Adds S(B) into `total` with one forward and one backward per study: the loop's summands and the loop's coupled
    batch gradient, from fewer graph traversals. Returns how many patients were clipped and the terms' means.

    1. Each study's forward of its per-patient terms, its encoder outputs kept with their graph (the loop's pass
       without its backward), on `workers` threads.
    2. The coupled terms on those outputs stacked in batch order, differentiated as far as each study's cut
       embeddings (`coupled_cotangents`): they act on B rows, so this is cheap.
    3. Each study's graph taken back once with two cotangents batched (`is_grads_batched`): 1 on its per-patient loss
       gives its per-patient gradient g_k, its embeddings' gradients v_k give J_k^T v_k, its part of the coupled
       gradient. g_k is clipped to C and summed; the J_k^T v_k are summed, with the coupled terms' own parameters'
       gradient, into the one coupled vector, clipped to C_b as a whole.
    Each g_k is the loop's (study k's batch of one), the coupled vector is grad L_K(B) by the chain rule: Lemma 1's
    S(B) (docs/privacy.md, "Per-patient summands in one pass")."""
    embed_once = getattr(model, "embed_tag_queries_once", None)
    if embed_once is not None:   # the model's one write to itself: not on two threads at once
        embed_once()

    def forward_share(share: list[tuple[int, dict]], _unused: list[Tensor]):
        kept = []
        for index, study in share:
            inputs = model.step_inputs(study)
            with autocast():
                out = model(study, step=step, inputs=inputs)
            if not torch.isfinite(out["loss"]):
                raise NonFiniteStep(step, "loss", {k: float(v) for k, v in out.items()})
            for row in model.coupled_rows(coupled_terms):   # what the coupled terms read, here on this thread
                getattr(inputs, row)
            kept.append((index, out["loss"], inputs, {name: float(v.detach()) for name, v in out.items()}))
        return kept

    with only_terms(model, per_patient_terms):
        kept = sorted((study for share in sum_over_shares(forward_share, list(enumerate(studies)), workers, [])
                       for study in share), key=lambda study: study[0])
    with only_terms(model, coupled_terms):
        coupled, cotangents, coupled_values = coupled_cotangents(
            model, model.stacked_inputs([inputs for _, _, inputs, _ in kept]), step, params, autocast)

    n = len(params)

    def backward_share(share: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]], into: list[Tensor]) -> int:
        clipped_here = 0
        for loss, rows in share:
            per_patient, through_encoders = _per_patient_and_coupled_gradients(loss, rows, params)
            factor, norm = clip_factor(per_patient, clip.patient)
            clipped_here += norm > clip.patient
            add_scaled_(into[:n], per_patient, factor)
            add_scaled_(into[n:], through_encoders, 1.0)
        return clipped_here

    work = [(loss, rows) for (_, loss, _, _), rows in zip(kept, cotangents)]
    per_study_values = [values for _, _, _, values in kept]
    del kept   # each study's graph is freed by its backward, not kept to the end
    clipped = sum(sum_over_shares(backward_share, work, workers, [*total, *coupled]))
    factor, _ = clip_factor(coupled, clip.coupled, scale=coupled_scale)
    add_scaled_(total, coupled, factor)

    sums: dict[str, float] = {}
    for values in per_study_values:
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
    terms = {name: value / max(1, len(studies)) for name, value in sums.items() if name != "loss"}
    terms.update({name: value for name, value in coupled_values.items() if name != "loss"})
    return int(clipped), terms


def _per_patient_and_coupled_gradients(loss: Tensor, rows: list[tuple[Tensor, Tensor]], params: Sequence[nn.Parameter]
                                       ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """grad(loss) and sum over rows of J_row^T cotangent, w.r.t. params, from one backward through the graph they
    share: the two cotangents go back side by side as a batch of two (`is_grads_batched`)."""
    if not rows:
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        return [None if g is None else g.float() for g in grads], [None] * len(params)
    outputs = [loss, *(row for row, _ in rows)]
    batched = [torch.stack([torch.ones_like(loss), torch.zeros_like(loss)]),
               *(torch.stack([torch.zeros_like(g), g]) for _, g in rows)]
    grads = torch.autograd.grad(outputs, list(params), batched, allow_unused=True, is_grads_batched=True)
    return ([None if g is None else g[0].float() for g in grads], [None if g is None else g[1].float() for g in grads])


def _vmapped_fused_sum(model: TrainableModel, batch: dict, step: int, params: Sequence[nn.Parameter],
                       autocast: Callable[[], object], clip: ClipNorms, coupled_scale: float,
                       per_patient_terms: set[str], coupled_terms: set[str],
                       total: list[Tensor]) -> tuple[int, dict[str, float]]:
    """Adds S(B) into `total` from `vmapped_fused_gradients`: each study's per-patient gradient clipped to C, the
    coupled terms' batch gradient clipped to C_b as a whole. Returns how many patients were clipped and the terms."""
    per_patient, coupled, values, coupled_values = vmapped_fused_gradients(
        model, batch, step, params, autocast, per_patient_terms, coupled_terms)
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        raise NonFiniteStep(step, "loss", {k: v.tolist() for k, v in values.items()})
    row_sums, norms = clipped_row_sum(per_patient, clip.patient)
    torch._foreach_add_(total, row_sums)
    factor, _ = clip_factor(coupled, clip.coupled, scale=coupled_scale)
    add_scaled_(total, coupled, factor)
    terms = {name: float(value.mean()) for name, value in values.items() if name != "loss"}
    return int((norms > clip.patient).sum()), {**terms, **coupled_values}
