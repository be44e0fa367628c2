"""Per-site "scanner" appearance: a deterministic photometric shift applied to images at load time."""
from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner renders a radiograph; identity is (1, 1, 0, 0, 0)."""

    contrast: float = 1.0      # gain about mid-grey (0.5)
    gamma: float = 1.0         # exponent on the [0, 1] intensity
    noise_std: float = 0.0     # additive Gaussian noise, in [0, 1] units
    blur_sigma: float = 0.0    # Gaussian blur, in pixels of the image it is applied to
    border: float = 0.0        # dark frame (collimation), as a fraction of each side


def scanner_profile(site_index: int, seed: int = 0) -> ScannerProfile:
    """The profile of site `site_index`: site 0 is the identity, every other site a clearly
    different, reproducible draw (gamma alternates above and below 1 so neighbours differ)."""
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    if site_index == 0:
        return ScannerProfile()
    rng = np.random.default_rng([seed, site_index, 0x5CA7])
    direction = 1.0 if site_index % 2 else -1.0
    return ScannerProfile(
        contrast=float(rng.uniform(0.75, 1.3)),
        gamma=float(np.exp(direction * rng.uniform(0.15, 0.4))),
        noise_std=float(rng.uniform(0.005, 0.03)),
        blur_sigma=float(rng.uniform(0.0, 1.5)),
        border=float(rng.choice([0.0, rng.uniform(0.02, 0.06)])),
    )


def _noise_rng(profile: ScannerProfile, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{key}|{astuple(profile)}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge replication (numpy only, cheap at cache resolution)."""
    radius = int(np.ceil(3 * sigma))
    if radius < 1:
        return image
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        size = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(taps))
    return image


def _apply(image: np.ndarray, profile: ScannerProfile, key: str) -> np.ndarray:
    out = np.clip(image.astype(np.float32), 0.0, 1.0)
    out = _blur(out, profile.blur_sigma)
    out = np.power(out, profile.gamma)
    out = (out - 0.5) * profile.contrast + 0.5
    if profile.noise_std > 0:
        out = out + _noise_rng(profile, key).normal(0.0, profile.noise_std, out.shape).astype(np.float32)
    out = np.clip(out, 0.0, 1.0)
    if profile.border > 0:
        rows, cols = out.shape
        dy, dx = int(round(profile.border * rows)), int(round(profile.border * cols))
        out[:dy], out[rows - dy:], out[:, :dx], out[:, cols - dx:] = 0.0, 0.0, 0.0, 0.0
    return out.astype(np.float32)


def apply_scanner(image: np.ndarray | torch.Tensor, profile: ScannerProfile, key: str) -> np.ndarray | torch.Tensor:
    """Render `image` (float [H, W] array or [1, H, W] tensor in [0, 1], air dark) as the site's
    scanner would; `key` (the image id) seeds the noise, so the same image always looks the same."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"apply_scanner expects a [1, H, W] tensor, got shape {tuple(image.shape)}")
        out = _apply(image[0].detach().cpu().numpy(), profile, key)
        return torch.from_numpy(out)[None].to(device=image.device, dtype=image.dtype)
    if image.ndim != 2:
        raise ValueError(f"apply_scanner expects an [H, W] array, got shape {image.shape}")
    return _apply(image, profile, key).astype(image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32)
