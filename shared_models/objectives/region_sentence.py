"""ASG's anatomical region-sentence alignment (ARSA): each sentence against the regions of its own image."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def valid_boxes(boxes: Tensor) -> Tensor:
    """[B, R] True where a box is finite with positive width and height (missing boxes may be NaN or empty)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.isfinite(boxes).all(-1) & (x2 > x1) & (y2 > y1)


def region_features(patch_grid: Tensor, boxes: Tensor) -> Tensor:
    """RoIAlign (output 1x1) of every box on its own image's patch grid: [B, D, h, w] x [B, R, 4] -> [B, R, D].

    Each RoI's batch index is its row in this batch, built here from the tensors themselves, so a
    shuffled or sorted batch still pools each image's own regions (ASG's collate built the indices
    before sorting the batch and never fixed them).
    """
    batch, dim, height, width = patch_grid.shape
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [B={batch}, R, 4] (x1, y1, x2, y2 in [0, 1]), got {tuple(boxes.shape)}")
    num_regions = boxes.shape[1]
    # Invalid boxes are pooled over the whole grid to stay finite; callers mask them out.
    whole_image = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    boxes = torch.where(valid_boxes(boxes)[..., None], boxes, whole_image)
    scale = boxes.new_tensor([width, height, width, height])
    image_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(num_regions)
    rois = torch.cat([image_index[:, None], (boxes * scale).reshape(-1, 4)], dim=1)
    pooled = roi_align(patch_grid, rois.to(patch_grid.dtype), output_size=1, spatial_scale=1.0, aligned=True)
    return pooled.reshape(batch, num_regions, dim)


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
        if sentence_regions.numel() and int(sentence_regions.max()) >= num_regions:
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
