"""Symmetric InfoNCE between paired image and text embeddings (CLIP, MGCA, ASG IRA, G2D global loss)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.registry import register_objective


def similarity_logits(image_emb: Tensor, text_emb: Tensor, temperature: float) -> Tensor:
    """Cosine similarity of every image with every text, divided by the temperature: [B_image, B_text]."""
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected paired embeddings of one shape [B, D], got image {tuple(image_emb.shape)} "
            f"and text {tuple(text_emb.shape)}"
        )
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T / temperature


class GlobalContrastive(nn.Module):
    """Image->text and text->image cross-entropy with the paired sample as the positive, averaged."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        logits = similarity_logits(image_emb, text_emb, self.temperature)
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@register_objective("global", build=lambda c, m: GlobalContrastive(c["temperature"]),
                    inputs=("image_emb", "report_emb"), coupled=True)
def global_loss(model, s, step: int) -> dict[str, Tensor]:
    """Image <-> report (ASG IRA, G2D)."""
    return {"global": model.objectives["global"](s.image_emb, s.report_emb)}


@register_objective("global_impression", build=lambda c, m: GlobalContrastive(c["temperature"]),
                    inputs=("image_emb", "impression_emb"), coupled=True, starts={"global_impression": "stage2"})
def global_impression_loss(model, s, step: int) -> dict[str, Tensor]:
    """Image <-> impression, the whole report where a study has none (HybridMED L_CG)."""
    return {"global_impression": model.objectives["global_impression"](s.image_emb, s.impression_emb)}
