"""ASG's soft-label contrastive loss (ERL): studies with similar tags are partial positives."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .global_contrastive import similarity_logits
from .registry import register_objective


def tag_similarity(tags: Tensor) -> Tensor:
    """Cosine similarity of the studies' present-tag vectors (tag == 1): [B, B].

    A study without any present tag is dissimilar (0) to every other study and identical (1) to itself.
    """
    present = F.normalize((tags == 1).float(), dim=1)  # an all-zero row stays zero
    similarity = present @ present.T
    return similarity.fill_diagonal_(1.0)


def soft_targets(tags: Tensor, alpha: float = 0.8, eps: float = 1e-6) -> Tensor:
    """Rows of alpha * I + (1 - alpha) * tag similarity, L1-normalised; eps keeps log(target) finite."""
    identity = torch.eye(tags.shape[0], device=tags.device)
    mixed = alpha * identity + (1 - alpha) * tag_similarity(tags) + eps
    return mixed / mixed.sum(dim=1, keepdim=True)


def symmetric_kl(logits: Tensor, target: Tensor) -> Tensor:
    """(KL(target || softmax(logits)) + KL(softmax(logits) || target)) / 2, averaged over rows."""
    log_prob = F.log_softmax(logits, dim=1)
    log_target = target.log()
    forward = F.kl_div(log_prob, log_target, reduction="batchmean", log_target=True)
    backward = F.kl_div(log_target, log_prob, reduction="batchmean", log_target=True)
    return (forward + backward) / 2


class SoftLabelContrastive(nn.Module):
    """Symmetric KL between tag-derived soft targets and the image-text similarity distribution, i2t and t2i."""

    def __init__(self, temperature: float = 0.07, alpha: float = 0.8, eps: float = 1e-6):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.eps = eps

    def forward(self, image_emb: Tensor, text_emb: Tensor, tags: Tensor) -> Tensor:
        if tags.dim() != 2 or tags.shape[0] != image_emb.shape[0]:
            raise ValueError(f"tags must be [B, T] with B = {image_emb.shape[0]}, got {tuple(tags.shape)}")
        logits = similarity_logits(image_emb, text_emb, self.temperature)
        target = soft_targets(tags, self.alpha, self.eps)  # symmetric, so it serves both directions
        return (symmetric_kl(logits, target) + symmetric_kl(logits.T, target)) / 2


@register_objective("soft_label", build=lambda c, m: SoftLabelContrastive(c["temperature"], c["alpha"]),
                    inputs=("image_emb", "report_emb"), batch=("tags",), coupled=True)
def soft_label_loss(model, s, step: int) -> dict[str, Tensor]:
    """ASG ERL."""
    return {"soft_label": model.objectives["soft_label"](s.image_emb, s.report_emb, s.batch["tags"])}
