"""ASG's anatomical region-sentence alignment (ARSA): each sentence against the regions of its own image."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.checks import values_checkable


def valid_boxes(boxes: Tensor) -> Tensor:
    """[B, R] True where a box is finite with positive width and height (missing boxes may be NaN or empty)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.isfinite(boxes).all(-1) & (x2 > x1) & (y2 > y1)


def _cell_overlaps(low: Tensor, high: Tensor, cells: int) -> Tensor:
    """[..., cells] length of [low, high] (grid units) inside each cell [c, c + 1]."""
    edges = torch.arange(cells, device=low.device, dtype=low.dtype)
    return (torch.minimum(high[..., None], edges + 1) - torch.maximum(low[..., None], edges)).clamp(min=0)


def region_features(patch_grid: Tensor, boxes: Tensor) -> Tensor:
    """The mean of every box on its own image's patch grid: [B, D, h, w] x [B, R, 4] -> [B, R, D].

    Each cell weighs by its area inside the box: RoIAlign's 1x1 average with exact area weights in place of
    bilinear samples. It is one einsum over each image's own grid, so a shuffled batch still pools each
    image's own regions, and torch.func.vmap batches it (DP-SGD's per-study gradients), which torchvision's
    roi_align does not allow.
    """
    batch, dim, height, width = patch_grid.shape
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [B={batch}, R, 4] (x1, y1, x2, y2 in [0, 1]), got {tuple(boxes.shape)}")
    # Invalid boxes are pooled over the whole grid to stay finite; callers mask them out.
    whole_image = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    boxes = torch.where(valid_boxes(boxes)[..., None], boxes, whole_image).to(patch_grid.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    across = _cell_overlaps(x1 * width, x2 * width, width)       # [B, R, w]
    down = _cell_overlaps(y1 * height, y2 * height, height)      # [B, R, h]
    area = (across.sum(-1) * down.sum(-1)).clamp_min(1e-6)       # 0 only for a box wholly off the image
    return torch.einsum("brh,brw,bdhw->brd", down, across, patch_grid) / area[..., None]


class RegionSentenceAlignment(nn.Module):
    """Cross-entropy sentence->region and region->sentence inside each image, cosine similarity / temperature.

    A sentence pairs with the region its triplet names; sentences without a region (or whose region has
    no valid box) are left out; a region named by several sentences has them all as positives.
    Each usable sentence and each named region counts once in the batch mean.
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, patch_grid: Tensor, boxes: Tensor, sentence_emb: Tensor, sentence_regions: Tensor) -> Tensor:
        if sentence_emb.shape[:2] != sentence_regions.shape or sentence_emb.shape[0] != patch_grid.shape[0]:
            raise ValueError(
                f"sentence_emb [B, S, D] {tuple(sentence_emb.shape)} and sentence_regions [B, S] "
                f"{tuple(sentence_regions.shape)} must match the batch of patch_grid {tuple(patch_grid.shape)}"
            )
        num_regions = boxes.shape[1]
        if values_checkable() and sentence_regions.numel() and int(sentence_regions.max()) >= num_regions:
            raise ValueError(
                f"sentence_regions names region {int(sentence_regions.max())} but boxes hold only {num_regions} regions"
            )
        regions = F.normalize(region_features(patch_grid, boxes), dim=-1)
        sentences = F.normalize(sentence_emb, dim=-1)
        logits = (sentences @ regions.transpose(1, 2)).float() / self.temperature  # [B, S, R]

        region_ok = valid_boxes(boxes)
        target = sentence_regions.clamp_min(0)
        usable = (sentence_regions >= 0) & region_ok.gather(1, target)  # [B, S]
        positive = usable[:, :, None] & (target[:, :, None] == torch.arange(num_regions, device=logits.device))
        named = positive.any(dim=1)  # [B, R] regions some sentence of the image names

        floor = torch.finfo(logits.dtype).min  # finite, so rows with nothing valid stay NaN-free
        to_region = F.log_softmax(logits.masked_fill(~region_ok[:, None, :], floor), dim=2)
        sentence_loss = -to_region.gather(2, target[..., None]).squeeze(2)
        to_sentence = F.log_softmax(logits.masked_fill(~usable[:, :, None], floor), dim=1)
        region_loss = -torch.where(positive, to_sentence, 0.0).sum(1) / positive.sum(1).clamp_min(1)

        sentence_term = torch.where(usable, sentence_loss, 0.0).sum() / usable.sum().clamp_min(1)
        region_term = torch.where(named, region_loss, 0.0).sum() / named.sum().clamp_min(1)
        # With no usable sentence both sums are an exact 0 that still belongs to the graph.
        return (sentence_term + region_term) / 2
