"""The pre-training model: encoders, projection heads and the enabled objectives, weighted and scheduled.

The objectives themselves (config section, module, loss terms, what they read, whether they couple a batch's
studies, when they start) are registered in shared_models/objectives/; this module loops over that registry."""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from shared_models.batch import SECTIONS
from shared_models.image_encoder import ImageEncoder, ImageFeatures
from shared_models.objectives.registry import objective_of_term, objectives
from shared_models.objectives.schedule import resolve_schedule
from shared_models.projection import create_projection_head
from shared_models.text_encoder import TextEncoder, TextFeatures
from shared_models.vocab import OBSERVATIONS


# The `StepInputs` rows that hold the findings words (token alignment and summarisation read them).
FINDINGS_INPUTS = {"findings_tokens", "word_mask", "word_weights"}


def term_start_steps(objective, total_steps: int | None = None) -> dict[str, int]:
    """The first optimizer step of each weighted term in a run of `total_steps` (objectives/schedule.py)."""
    return resolve_schedule(objective, total_steps).start_step


def terms_never_trained(objective, steps: int) -> dict[str, int]:
    """Weighted terms that a run of `steps` optimizer steps never trains (their start step is not below it)."""
    return {term: start for term, start in term_start_steps(objective, steps).items() if start >= steps}


def schedule_notice(objective, steps: int, trainer: str) -> str | None:
    """What a person should know when `trainer`'s `steps` optimizer steps never reach some weighted terms."""
    missed = terms_never_trained(objective, steps)
    if not missed:
        return None
    listed = ", ".join(f"{term} (from step {start})" for term, start in sorted(missed.items()))
    return (f"{trainer} trains {steps} steps, so these weighted terms of objective {objective.get('name', '')!r} "
            f"never train: {listed}. Lower objective.schedule.stage2_step / seg_start_step, give them as fractions "
            "of the run (stage2_at / seg_start_at), or train more steps")


class PretrainModel(nn.Module):
    """`forward(batch, step)` returns every active loss term and `loss` = sum of lambda * term."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        tokenizer: PreTrainedTokenizerBase,
        objective: dict,
        projection_dim: int = 128,
        projection_head: str = "linear",
        projection_hidden_dim: int = 512,
        total_steps: int | None = None,
    ):
        """`total_steps`: the run's optimizer steps, against which the schedule's fractions resolve."""
        super().__init__()
        known = objective_of_term()
        unknown = set(objective["lambdas"]) - set(known)
        if unknown:
            raise ValueError(f"objective.lambdas names unknown terms {sorted(unknown)}; known: {sorted(known)}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.projection_dim = projection_dim
        self.lambdas = {term: float(w) for term, w in objective["lambdas"].items() if float(w) > 0}
        self.objective_config = objective
        self.plan_schedule(total_steps)

        # Global heads map to the contrastive space; token heads map patches, words and sentences to one
        # space shared by the local objectives and the decoders.
        image_dim, text_dim = image_encoder.feature_dim, text_encoder.hidden_size
        self.image_projection = create_projection_head(projection_head, image_dim, projection_dim, projection_hidden_dim)
        self.text_projection = create_projection_head(projection_head, text_dim, projection_dim, projection_hidden_dim)
        self.image_token_projection = nn.Linear(image_dim, projection_dim)
        self.text_token_projection = nn.Linear(text_dim, projection_dim)

        self._has_batch_norm_heads = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in [*self.image_projection.modules(),
                                                                       *self.text_projection.modules()]
        )

        modules = sorted({known[term].name for term in self.lambdas})
        missing = [m for m in modules if m not in objective]
        if missing:
            raise ValueError(f"objective enables terms of {missing} but has no config section for them")
        registry = objectives()
        self.objectives = nn.ModuleDict({m: registry[m].build(dict(objective[m]), self) for m in modules})
        # Whether the report pass encodes the findings apart (`StepInputs.report`): only when some term reads them,
        # so that clip, asg and g2d encode the report whole, as their papers do.
        self.reads_findings = any(set(known[term].inputs) & FINDINGS_INPUTS for term in self.lambdas)

    # -- schedule -------------------------------------------------------------------------------
    def plan_schedule(self, total_steps: int | None) -> None:
        """Resolve `objective.schedule` for a run of `total_steps` (its fractions of the run become steps)."""
        self.schedule = resolve_schedule(self.objective_config, total_steps)

    def active_terms(self, step: int) -> list[str]:
        return [term for term in self.lambdas if step >= self.schedule.start_step.get(term, 0)]

    def hybridmed_stage(self, step: int) -> int:
        return self.schedule.hybridmed_stage(step)

    # -- tag queries ----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_tag_queries(self) -> None:
        """Embed the tag names with the current text encoder (once at start, then when asked, e.g. per round)."""
        names = [name.replace("_", " ") for name in OBSERVATIONS]
        encoded = self.tokenizer(names, padding=True, return_tensors="pt").to(self.text_token_projection.weight.device)
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        cls = self.text_encoder(encoded["input_ids"], encoded["attention_mask"]).report_emb
        self.text_encoder.train(was_training)
        self.objectives["tag"].set_tag_queries(self.text_token_projection(cls))

    def embed_tag_queries_once(self) -> None:
        """Embed the tag queries if the tag term is weighted and they never were (a training step needs them)."""
        if "tag" in self.lambdas and int(self.objectives["tag"].query_updates) == 0:
            self.refresh_tag_queries()

    # -- embeddings for retrieval, zero-shot and evaluation -------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_projection(self.image_encoder(images).global_emb), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask).report_emb), dim=-1)

    # -- training step --------------------------------------------------------------------------
    def step_inputs(self, batch: dict[str, Tensor]) -> StepInputs:
        """The batch's encoder outputs, computed on first use; pass them to `forward` to keep them."""
        return StepInputs(self, batch)

    def coupled_rows(self, terms) -> list[str]:
        """The encoder outputs of a study that the coupled `terms` read: a per-study pass can compute them."""
        known = objective_of_term()
        return list(dict.fromkeys(row for term in terms if known[term].coupled for row in known[term].inputs))

    def stacked_inputs(self, studies: list[StepInputs]) -> StackedInputs:
        """The coupled terms' inputs for the batch of `studies`, each encoded on its own (`StackedInputs`)."""
        return StackedInputs(studies)

    def forward(self, batch: dict[str, Tensor], step: int, inputs: StepInputs | None = None) -> dict[str, Tensor]:
        """`inputs`: the batch's encoder outputs to use (and keep), e.g. `StackedInputs` of studies already
        encoded one by one; by default computed here from `batch`."""
        terms_now = self.active_terms(step)
        if not terms_now:
            raise ValueError(f"no objective term is active at step {step}; lambdas: {self.lambdas}")
        if self.training and len(batch["images"]) < 2 and self._has_batch_norm_heads:
            raise ValueError("a training batch of 1 study: model.projection_head=mlp_bn standardises over the batch "
                             "and needs at least 2; raise train.batch_size (or add studies), or use projection_head=linear")
        self.embed_tag_queries_once()
        inputs = inputs if inputs is not None else StepInputs(self, batch)
        out: dict[str, Tensor] = {}
        known = objective_of_term()
        for objective in {known[term].name: known[term] for term in terms_now}.values():
            computed = objective.loss(self, inputs, step)
            out.update({term: value for term, value in computed.items() if term in terms_now})
        out["loss"] = sum(self.lambdas[term] * out[term] for term in terms_now)
        return out


class StepInputs:
    """Encoder outputs of one batch, each computed on first use and only if some active term needs it."""

    def __init__(self, model: PretrainModel, batch: dict[str, Tensor]):
        self.model, self.batch = model, batch

    @cached_property
    def image(self) -> ImageFeatures:
        return self.model.image_encoder(self.batch["images"])

    @cached_property
    def image_emb(self) -> Tensor:
        return self.model.image_projection(self.image.global_emb)

    @cached_property
    def patch_tokens(self) -> Tensor:
        return self.model.image_token_projection(self.image.patch_tokens)

    @cached_property
    def report(self) -> TextFeatures:
        """The report pass. When a weighted term reads the findings words, they attend only to each other: they are
        the findings encoded as if alone (HybridMED encodes the findings apart), and no third pass is needed."""
        b = self.batch
        return self.model.text_encoder(
            b["report_ids"], b["report_mask"], b["sentence_ids"], num_sentences=b["sentence_regions"].shape[1],
            apart=self.findings_words if self.model.reads_findings else None,
        )

    @cached_property
    def findings_words(self) -> Tensor:
        """The report's findings tokens (sentences of the FINDINGS section, [CLS] and [SEP] excluded)."""
        return (self.batch["report_sections"] == SECTIONS["findings"]) & self.batch["report_mask"].bool()

    @cached_property
    def report_emb(self) -> Tensor:
        return self.model.text_projection(self.report.report_emb)

    @cached_property
    def findings_tokens(self) -> Tensor:
        """[B, L, D] projected report tokens; `word_mask` picks the findings words among them."""
        return self.model.text_token_projection(self.report.token_embeds)

    @cached_property
    def word_mask(self) -> Tensor:
        """Findings words, none for studies without findings."""
        return self.findings_words & self.batch["has_findings"][:, None]

    @cached_property
    def word_weights(self) -> Tensor:
        """The report [CLS]'s last-layer attention over its tokens (token alignment keeps the findings words')."""
        return self.report.word_weights

    @cached_property
    def impression_emb(self) -> Tensor:
        """Projected impression embedding; the whole report's where a study has no impression."""
        b = self.batch
        impression = self.model.text_encoder(b["impression_ids"], b["impression_mask"]).report_emb
        return torch.where(b["has_impression"][:, None], self.model.text_projection(impression), self.report_emb)


class StackedInputs:
    """The coupled terms' inputs for a batch whose studies were encoded one at a time (`StepInputs` each, graph
    kept): row i is study i's own embedding, as one forward of the batch computes it when the encoders treat
    every study on its own (no BatchNorm). DP-SGD's per-patient loop reuses those forwards for the coupled terms
    instead of encoding the batch again.

    The rows are leaf copies of the studies' embeddings, each listed as (study index, embedding, leaf) in `cuts`:
    a backward stops at the leaves, and each study's encoder graph is then taken on its own (on its own thread)
    with its leaves' gradients."""

    def __init__(self, studies: list[StepInputs]):
        self.studies = studies
        self.cuts: list[tuple[int, Tensor, Tensor]] = []
        self.batch = {key: torch.cat([s.batch[key] for s in studies]) for key in ("images", "tags")}

    def _rows(self, name: str) -> Tensor:
        rows = [getattr(study, name) for study in self.studies]
        leaves = [row.detach().requires_grad_() for row in rows]
        self.cuts += [(i, row, leaf) for i, (row, leaf) in enumerate(zip(rows, leaves))]
        return torch.cat(leaves)

    @cached_property
    def image_emb(self) -> Tensor:
        return self._rows("image_emb")

    @cached_property
    def report_emb(self) -> Tensor:
        return self._rows("report_emb")

    @cached_property
    def impression_emb(self) -> Tensor:
        return self._rows("impression_emb")
