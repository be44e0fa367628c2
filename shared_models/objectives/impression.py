"""HybridMED's impression generation: one decoder, shared self-attention/FFN, a cross-attention per branch."""
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.checks import values_checkable
from shared_models.objectives.registry import register_objective

BRANCHES = ("caption", "summary")  # caption attends to image patches, summary to findings tokens


def _check_branch(branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")


def _detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def frozen_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """`norm(x)` with its weights as constants: gradients reach `x`, never the weights."""
    return F.layer_norm(x, norm.normalized_shape, _detached(norm.weight), _detached(norm.bias), norm.eps)


def frozen_attention(attention: nn.MultiheadAttention, query: Tensor, memory: Tensor,
                     key_padding_mask: Tensor) -> Tensor:
    """`attention(query, memory, memory)` (batch first) with its weights as constants.

    Reads the module's weights detached instead of swapping them out (torch.func.functional_call): a swap is a
    write to the shared model, and DP-SGD's loop runs studies on several threads at once
    (client/privacy/clipped_sum.py), where a swap on one thread is what another thread saves and restores."""
    query, memory = query.transpose(0, 1), memory.transpose(0, 1)
    out, _ = F.multi_head_attention_forward(
        query, memory, memory, attention.embed_dim, attention.num_heads,
        _detached(attention.in_proj_weight), _detached(attention.in_proj_bias), None, None, False,
        attention.dropout, _detached(attention.out_proj.weight), _detached(attention.out_proj.bias),
        training=attention.training, key_padding_mask=key_padding_mask, need_weights=False,
    )
    return out.transpose(0, 1)


class SharedBranchLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention and FFN for every branch, cross-attention per branch."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.ModuleDict({b: nn.LayerNorm(dim) for b in BRANCHES})
        self.cross_attention = nn.ModuleDict(
            {b: nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True) for b in BRANCHES}
        )
        hidden = int(dim * mlp_ratio)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, causal_mask: Tensor, memory: Tensor, memory_mask: Tensor, branch: str,
                frozen: bool = False) -> Tensor:
        """`frozen`: the branch's own weights (its cross-attention and norm) are constants in this pass."""
        h = self.self_norm(x)
        x = x + self.self_attention(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        # A row with no valid memory (e.g. a study without findings) attends to all of it to stay finite
        # (a fully masked softmax is NaN, and NaN leaks into every gradient), then its output is zeroed.
        has_memory = memory_mask.any(dim=1)
        padding = ~memory_mask & has_memory[:, None]
        if frozen:
            h = frozen_layer_norm(self.cross_norm[branch], x)
            context = frozen_attention(self.cross_attention[branch], h, memory, padding)
        else:
            h = self.cross_norm[branch](x)
            context = self.cross_attention[branch](h, memory, memory, key_padding_mask=padding, need_weights=False)[0]
        x = x + context * has_memory[:, None, None]
        return x + self.mlp(self.mlp_norm(x))


class ImpressionDecoder(nn.Module):
    """Causal transformer decoder over impression tokens, conditioned on `memory` through the chosen branch."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        pad_id: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layers = nn.ModuleList(SharedBranchLayer(dim, num_heads, dropout=dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def named_branch_parameters(self, branch: str) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters owned by one branch (its cross-attention and that attention's norm), with names."""
        _check_branch(branch)
        owned = (f"cross_attention.{branch}.", f"cross_norm.{branch}.")
        for name, parameter in self.named_parameters():
            if any(part in name for part in owned):
                yield name, parameter

    def branch_parameters(self, branch: str) -> Iterator[nn.Parameter]:
        return (parameter for _, parameter in self.named_branch_parameters(branch))

    def forward(
        self, input_ids: Tensor, input_mask: Tensor, memory: Tensor, memory_mask: Tensor, branch: str,
        frozen: bool = False,
    ) -> Tensor:
        """`frozen`: the branch's own weights (`named_branch_parameters`) get no gradient from this pass."""
        _check_branch(branch)
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"impression has {length} tokens, more than the decoder's max_len={self.max_len}")
        # Only a causal mask in self-attention: with right padding a real token never sees padding.
        if values_checkable() and (input_mask[:, 1:].bool() & ~input_mask[:, :-1].bool()).any():
            raise ValueError("impression tokens must be right-padded (tokenizer padding_side='right')")
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)
        x = self.token_embedding(input_ids) + self.position_embedding[:length]
        for layer in self.layers:
            x = layer(x, causal_mask, memory, memory_mask.bool(), branch, frozen)
        return self.head(self.norm(x))


def token_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over real (unpadded) target tokens; 0 when there are none."""
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) per token at `temperature`, times temperature^2 (Hinton et al.), over real tokens."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # float: low precision breaks small KLs
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1) * temperature**2


class ImpressionGeneration(nn.Module):
    """Loss terms `summary`, `caption`, `distill` of HybridMED for one stage of its two-stage schedule.

    Stage 1 trains summarisation alone. Stage 2 trains everything, with the summarisation branch frozen
    as the teacher: its own parameters enter the graph detached (so they receive no gradient whatever the
    optimizer holds) and its logits are detached as distillation targets; the shared self-attention/FFN
    keep learning through both terms.
    """

    def __init__(self, decoder: ImpressionDecoder, distill_temperature: float = 2.0):
        super().__init__()
        self.decoder = decoder
        self.distill_temperature = distill_temperature

    def forward(
        self,
        impression_ids: Tensor,
        impression_mask: Tensor,
        patch_tokens: Tensor,
        findings_tokens: Tensor,
        findings_mask: Tensor,
        stage: int,
    ) -> dict[str, Tensor]:
        if stage not in (1, 2):
            raise ValueError(f"HybridMED stage must be 1 (summarisation only) or 2 (all terms), got {stage!r}")
        inputs, targets = impression_ids[:, :-1], impression_ids[:, 1:]
        input_mask, target_mask = impression_mask[:, :-1], impression_mask[:, 1:].bool()

        summary_logits = self.decoder(inputs, input_mask, findings_tokens, findings_mask, "summary", frozen=stage == 2)
        terms = {"summary": token_cross_entropy(summary_logits, targets, target_mask)}
        if stage == 1:
            return terms

        patch_mask = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
        caption_logits = self.decoder(inputs, input_mask, patch_tokens, patch_mask, "caption")
        terms["caption"] = token_cross_entropy(caption_logits, targets, target_mask)
        terms["distill"] = distillation_kl(
            caption_logits, summary_logits.detach(), target_mask, self.distill_temperature
        )
        return terms


def build_impression(c: dict, m) -> ImpressionGeneration:
    decoder = ImpressionDecoder(vocab_size=len(m.tokenizer), dim=m.projection_dim, num_layers=c["layers"],
                                num_heads=c["heads"], max_len=c["max_len"], pad_id=m.tokenizer.pad_token_id)
    return ImpressionGeneration(decoder, c["distill_temperature"])


@register_objective("impression", terms=("summary", "caption", "distill"), build=build_impression,
                    inputs=("patch_tokens", "findings_tokens", "word_mask"),
                    batch=("has_impression", "impression_ids", "impression_mask"),
                    starts={"caption": "stage2", "distill": "stage2"})
def impression_loss(model, s, step: int) -> dict[str, Tensor]:
    """HybridMED L_Sum, L_Cap, L_Dis. On every row, studies lacking findings or impression masked out of the
    token means: no branch on the batch's values, so the same code runs under DP-SGD's vmapped per-study
    gradients (no row: exact 0s)."""
    b = s.batch
    words = s.word_mask   # the summary branch's memory: the findings words (none left after truncation: no row)
    rows = words.any(dim=1) & b["has_impression"]
    # A row without findings would cross-attend to no token (NaN); give it the first one, its loss is masked.
    findings_mask = words | (~rows[:, None] & (torch.arange(words.shape[1], device=words.device) == 0))
    # In stage 1 only the summary branch runs, so the image encoder is not needed for it.
    stage = model.hybridmed_stage(step)
    patches = s.patch_tokens if stage == 2 else s.findings_tokens.new_zeros(len(rows), 1, 1)
    return model.objectives["impression"](
        b["impression_ids"], b["impression_mask"] * rows[:, None], patches, s.findings_tokens, findings_mask, stage,
    )
