"""ASG's anatomical region-sentence alignment (ARSA): each sentence against the regions of its own image."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.checks import values_checkable
from shared_models.objectives.registry import register_objective


def valid_boxes(boxes: Tensor) -> Tensor:
    """[B, R] True where a box is finite with positive width and height (missing boxes may be NaN or empty)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.isfinite(boxes).all(-1) & (x2 > x1) & (y2 > y1)


def _axis_weights(start: Tensor, length: Tensor, cells: int) -> Tensor:
    """[..., cells] RoIAlign's weight on each cell along one axis, for a 1-bin RoI: the mean over its
    ceil(length) sample points of each point's linear-interpolation weights (torchvision's rules: a point
    beyond [-1, cells] weighs nothing, one below 0 reads cell 0, one past the last cell centre the last)."""
    samples = torch.arange(cells + 1, device=start.device, dtype=start.dtype)      # ceil(length) <= cells
    count = length.ceil().clamp(min=1)[..., None]
    point = start[..., None] + (samples + 0.5) * length[..., None] / count            # [..., S]
    used = (samples < count) & (point >= -1.0) & (point <= cells)
    point = point.clamp(min=0)
    low = point.floor().clamp(max=cells - 1)
    point = torch.where(low >= cells - 1, low, point)
    high = (low + 1).clamp(max=cells - 1)
    frac = point - low
    grid = torch.arange(cells, device=start.device, dtype=start.dtype)
    weights = ((1 - frac)[..., None] * (low[..., None] == grid) + frac[..., None] * (high[..., None] == grid))
    return (weights * used[..., None]).sum(-2) / count


def region_features(patch_grid: Tensor, boxes: Tensor) -> Tensor:
    """RoIAlign (output 1x1, aligned, adaptive sampling) of every box on its own image's patch grid:
    [B, D, h, w] x [B, R, 4] -> [B, R, D].

    torchvision's roi_align computes the same numbers but cannot run under torch.func.vmap (DP-SGD's
    per-study gradients). A 1x1 bin averages bilinear samples on a grid of points, and bilinear weights
    factor into a row and a column part, so the average is one einsum of per-axis weights; each RoI
    reads only its own image, so a shuffled batch still pools each image's own regions.
    """
    batch, dim, height, width = patch_grid.shape
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [B={batch}, R, 4] (x1, y1, x2, y2 in [0, 1]), got {tuple(boxes.shape)}")
    # Invalid boxes are pooled over the whole grid to stay finite; callers mask them out.
    whole_image = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    boxes = torch.where(valid_boxes(boxes)[..., None], boxes, whole_image).to(patch_grid.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    across = _axis_weights(x1 * width - 0.5, (x2 - x1) * width, width)       # [B, R, w]
    down = _axis_weights(y1 * height - 0.5, (y2 - y1) * height, height)      # [B, R, h]
    return torch.einsum("brh,brw,bdhw->brd", down, across, patch_grid)


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


@register_objective("region", build=lambda c, m: RegionSentenceAlignment(c["temperature"]),
                    inputs=("image", "patch_tokens", "report"), batch=("sentence_regions", "boxes"))
def region_loss(model, s, step: int) -> dict[str, Tensor]:
    """ASG ARSA."""
    h, w = s.image.grid_hw
    grid = s.patch_tokens.transpose(1, 2).reshape(s.patch_tokens.shape[0], -1, h, w)
    sentences = model.text_token_projection(s.report.sentence_embeds)
    regions = s.batch["sentence_regions"].masked_fill(~s.report.sentence_mask, -1)
    return {"region": model.objectives["region"](grid, s.batch["boxes"], sentences, regions)}
