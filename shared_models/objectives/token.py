"""MGCA's token-level alignment: each word against its attended image feature, each patch against its attended words."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.registry import register_objective


def masked_quantiles(values: Tensor, mask: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """[B, 1] per q: each row's q-quantile over its valid entries, interpolated linearly as torch.nanquantile
    does; written with sort and gather so that torch.func.vmap batches it (nanquantile writes in place)."""
    ordered = values.masked_fill(~mask, float("inf")).sort(dim=1).values
    last = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0).to(values.dtype)
    quantiles = []
    for q in qs:
        position = q * last
        below, above = position.floor(), position.ceil()
        low_value, high_value = ordered.gather(1, below.long()), ordered.gather(1, above.long())
        quantiles.append(low_value + (position - below) * (high_value - low_value))
    return quantiles


def clip_and_normalise_weights(
    weights: Tensor, mask: Tensor | None = None, low: float = 0.1, high: float = 0.9
) -> Tensor:
    """Clip each row to its own [low, high] quantiles over its valid entries, zero padding, rows sum to 1.

    Clipping keeps a few tokens with extreme attention (e.g. [SEP], a corner patch) from dominating the loss.
    The weights are importance scores, not something to learn through, so they are detached.
    """
    weights = weights.detach().float()
    mask = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != weights.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and mask {tuple(mask.shape)} must have one shape [B, K]")
    lower, upper = masked_quantiles(weights, mask, (low, high))
    clipped = torch.minimum(torch.maximum(weights, lower), upper).masked_fill(~mask, 0.0)
    return clipped / clipped.sum(dim=1, keepdim=True).clamp_min(torch.finfo(clipped.dtype).tiny)


def attend(queries: Tensor, keys: Tensor, key_mask: Tensor, temperature: float) -> Tensor:
    """Parameter-free cross-attention (MGCA's default): softmax(q k^T / temperature) v with v = k, L2-normalised."""
    scores = queries @ keys.transpose(1, 2) / temperature
    scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(scores.dtype).min)
    return F.normalize(scores.softmax(dim=-1) @ keys, dim=-1)


def within_sample_contrast(
    tokens: Tensor, attended: Tensor, mask: Tensor, weights: Tensor, temperature: float
) -> Tensor:
    """Weighted InfoNCE inside each sample: token k vs attended feature k, other tokens of the sample as negatives.

    Both directions (token -> attended feature, attended feature -> token); padding is neither anchor nor negative.
    Returns [B], each sample's weighted mean over its tokens.
    """
    logits = tokens @ attended.transpose(1, 2) / temperature  # [B, K, K]
    pair_mask = mask[:, :, None] & mask[:, None, :]
    logits = logits.masked_fill(~pair_mask, torch.finfo(logits.dtype).min)  # finite: no NaN on empty rows
    to_attended = -F.log_softmax(logits, dim=2).diagonal(dim1=1, dim2=2)
    to_token = -F.log_softmax(logits, dim=1).diagonal(dim1=1, dim2=2)
    return (((to_attended + to_token) / 2) * weights).sum(dim=1)


class TokenAlignment(nn.Module):
    """Word->patch plus patch->word local loss of MGCA (loss_word + loss_patch), padding masked throughout.

    Unlike MGCA's released code, padded words are never negatives and samples without any word
    (no findings) contribute nothing instead of contrasting padding.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        patch_tokens: Tensor,
        patch_weights: Tensor,
        word_tokens: Tensor,
        word_mask: Tensor,
        word_weights: Tensor,
    ) -> Tensor:
        if patch_tokens.dim() != 3 or word_tokens.dim() != 3 or patch_tokens.shape[::2] != word_tokens.shape[::2]:
            raise ValueError(
                f"expected patch_tokens [B, N, D] and word_tokens [B, L, D], got {tuple(patch_tokens.shape)} "
                f"and {tuple(word_tokens.shape)}"
            )
        word_mask = word_mask.bool()
        patch_mask = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
        patches = F.normalize(patch_tokens, dim=-1)
        words = F.normalize(word_tokens, dim=-1)

        word_context = attend(words, patches, patch_mask, self.temperature)
        patch_context = attend(patches, words, word_mask, self.temperature)
        word_loss = within_sample_contrast(
            words, word_context, word_mask, clip_and_normalise_weights(word_weights, word_mask), self.temperature
        )
        patch_loss = within_sample_contrast(
            patches, patch_context, patch_mask, clip_and_normalise_weights(patch_weights, patch_mask), self.temperature
        )

        has_words = word_mask.any(dim=1)
        per_sample = (word_loss + patch_loss) * has_words
        return per_sample.sum() / has_words.sum().clamp_min(1)


@register_objective("token", build=lambda c, m: TokenAlignment(c["temperature"]),
                    inputs=("image", "patch_tokens", "findings_tokens", "word_mask", "word_weights"),
                    starts={"token": "stage2"})
def token_loss(model, s, step: int) -> dict[str, Tensor]:
    """HybridMED L_CL."""
    loss = model.objectives["token"](
        s.patch_tokens, s.image.patch_weights, s.findings_tokens, s.word_mask, s.word_weights
    )
    return {"token": loss}
