"""Segmentation probe: a small U-Net-style decoder on a (frozen or fine-tuned) encoder's feature pyramid."""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.metrics import dice_per_image, spread
from evaluation.sampling import sample_fraction

PyramidFn = Callable[[torch.Tensor], list[torch.Tensor]]   # images [B, 1, S, S] -> [B, C_i, H_i, W_i], fine to coarse


@dataclass
class SegmentationSettings:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    width: int = 32            # channels of every decoder stage
    bce_weight: float = 1.0    # loss = soft Dice + bce_weight * BCE
    threshold: float = 0.5     # on the sigmoid probability
    fine_tune: bool = False    # train the encoder too (pyramid_fn must then be an nn.Module)
    encoder_lr: float = 1e-4


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class UNetDecoder(nn.Module):
    """Each level squeezed to `width` channels by a 1x1 conv (wide encoders stay cheap); coarsest level
    in, then per finer level: upsample to its grid, concatenate it, two 3x3 convs; a 1x1 conv gives one
    logit per pixel, upsampled to the image size."""

    def __init__(self, channels: Sequence[int], width: int = 32, out_channels: int = 1):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.bottom = ConvBlock(width, width)
        self.up = nn.ModuleList(ConvBlock(2 * width, width) for _ in channels[:-1])
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, pyramid: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        levels = [lateral(level) for lateral, level in zip(self.lateral, pyramid)]
        x = self.bottom(levels[-1])
        for block, skip in zip(self.up, reversed(levels[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=image_size, mode="bilinear", align_corners=False)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0) -> torch.Tensor:
    """Soft Dice on sigmoid probabilities (per image, +1 smoothing so empty masks are learnable) + weighted BCE."""
    prob = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
    return (1 - dice).mean() + bce_weight * F.binary_cross_entropy_with_logits(logits, target)


def _pyramids(pyramid_fn: PyramidFn, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    with torch.no_grad():
        batches = [pyramid_fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(level) for level in zip(*batches)]


def train_decoder(pyramid_fn: PyramidFn, channels: Sequence[int], images: torch.Tensor, masks: torch.Tensor,
                  settings: SegmentationSettings = SegmentationSettings(), seed: int = 0):
    """Fit a decoder (and, when fine-tuning, a copy of the encoder) on images [N, 1, S, S] and masks
    [N, 1, S, S] in {0, 1}. Returns (decoder, pyramid_fn used for prediction)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    decoder = UNetDecoder(channels, settings.width)
    masks = masks.float()
    groups = [{"params": decoder.parameters(), "lr": settings.lr}]
    if settings.fine_tune:
        if not isinstance(pyramid_fn, nn.Module):
            raise TypeError("fine-tuning needs the pyramid function to be an nn.Module holding the encoder")
        pyramid_fn = copy.deepcopy(pyramid_fn).train()   # each seed starts from the same encoder weights
        groups.append({"params": pyramid_fn.parameters(), "lr": settings.encoder_lr})
        features = None
    else:
        if isinstance(pyramid_fn, nn.Module):
            pyramid_fn.eval()   # frozen means frozen normalisation statistics too
        features = _pyramids(pyramid_fn, images, settings.batch_size)   # extract once
    optimiser = torch.optim.AdamW(groups, weight_decay=1e-4)
    decoder.train()
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(images), generator=generator).split(settings.batch_size):
            pyramid = pyramid_fn(images[batch]) if features is None else [level[batch] for level in features]
            loss = dice_bce_loss(decoder(pyramid, images.shape[-2:]), masks[batch], settings.bce_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    if settings.fine_tune:
        pyramid_fn.eval()
    return decoder.eval(), pyramid_fn


def predict_masks(pyramid_fn: PyramidFn, decoder: UNetDecoder, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Sigmoid probabilities [N, S, S]."""
    with torch.no_grad():
        probs = [torch.sigmoid(decoder(pyramid_fn(images[i:i + batch_size]), images.shape[-2:]))
                 for i in range(0, len(images), batch_size)]
    return torch.cat(probs)[:, 0].numpy()


def run_segmentation(pyramid_fn: PyramidFn, channels: Sequence[int], train_images, train_masks,
                     train_patients: Sequence[str], test_images, test_masks, fractions: Sequence[float],
                     seeds: Sequence[int], settings: SegmentationSettings = SegmentationSettings()) -> tuple[dict, dict]:
    """Train and test at each label fraction (patients sampled per seed) -> (contract JSON, seed-0 details).

    JSON per fraction: dice_empty_as_one and dice_empty_excluded, each {mean, std, per_seed} over
    seeds of the mean per-image Dice; train_images per seed. Details per fraction: the seed-0
    per-image Dice under both conventions and its probability maps (for the report's plots)."""
    truth = np.asarray(test_masks).reshape(len(test_masks), *np.asarray(test_masks).shape[-2:]).astype(bool)
    results, details = {}, {}
    for fraction in fractions:
        per_seed = {"empty_as_one": [], "empty_excluded": []}
        sizes = []
        for seed in seeds:
            rows = torch.as_tensor(sample_fraction(train_patients, fraction, seed))
            decoder, fitted_fn = train_decoder(pyramid_fn, channels, train_images[rows], train_masks[rows], settings, seed)
            probs = predict_masks(fitted_fn, decoder, test_images, settings.batch_size)
            dice = {c: dice_per_image(probs >= settings.threshold, truth, c) for c in per_seed}
            for c, values in dice.items():
                per_seed[c].append(float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan"))
            sizes.append(len(rows))
            if seed == seeds[0]:
                details[str(fraction)] = {"dice": dice, "probabilities": probs}
        results[str(fraction)] = {f"dice_{c}": spread(v) for c, v in per_seed.items()}
        results[str(fraction)]["train_images"] = sizes
    return results, details
