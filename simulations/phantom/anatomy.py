"""Synthetic chest anatomy: where the thorax sits in the image and a frontal or lateral rendering of it.

Shapes live in thorax coordinates (u, v) in [0, 1]: u left to right on the image (the patient's
right is on the image's left), v top to bottom, the body spanning the unit square so that after a
crop to the body the zones agree roughly with `shared_models.vocab.ZONE_ATLAS`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDES = ("right", "left")


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise smooth over about 1/cells of the image (bicubic upsampled grid)."""
    rows, cols = shape
    coarse = rng.standard_normal((max(2, cells * rows // max(rows, cols)), max(2, cells * cols // max(rows, cols))))
    field = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((cols, rows), Image.BICUBIC))
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


@dataclass
class Thorax:
    """One patient's chest as positioned in one image: placement plus anatomical proportions."""

    rows: int
    cols: int
    center: tuple[float, float]        # thorax box centre (x, y) in pixels
    size: tuple[float, float]          # thorax box (width, height) in pixels
    angle: float                       # tilt in radians
    heart_width: float                 # in u units; cardiothoracic ratio = heart_width / lung span
    heart_center: tuple[float, float]
    heart_height: float
    dome: tuple[float, float]          # diaphragm dome height per side (right, left), in lung heights
    midline: float
    rib_phase: float
    rib_gap: float
    lung_bottom: tuple[float, float]

    LUNG_SPAN = 0.84                   # outer lung edges 0.08..0.92

    @property
    def cardiothoracic_ratio(self) -> float:
        return self.heart_width / self.LUNG_SPAN

    def grid(self, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) thorax coordinates of every pixel, or of the centre of every step x step block."""
        offset = (step - 1) / 2
        y, x = np.mgrid[0:self.rows:step, 0:self.cols:step].astype(np.float32) + offset
        dx, dy = x - self.center[0], y - self.center[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = (cos * dx + sin * dy) / self.size[0] + 0.5
        v = (-sin * dx + cos * dy) / self.size[1] + 0.5
        return u, v

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du, dv = (np.asarray(u) - 0.5) * self.size[0], (np.asarray(v) - 0.5) * self.size[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return self.center[0] + cos * du - sin * dv, self.center[1] + sin * du + cos * dv

    def lung_frame(self, side: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lung-local (s, t): s = 0 at the medial edge to 1 at the lateral edge, t = 0 apex to 1 base."""
        medial, lateral = (self.midline - 0.02, 0.08) if side == "right" else (self.midline + 0.02, 0.92)
        bottom = self.lung_bottom[SIDES.index(side)]
        return (u - medial) / (lateral - medial), (v - 0.10) / (bottom - 0.10)

    def lung(self, side: str, u: np.ndarray, v: np.ndarray, shrink: float = 1.0,
             toward: tuple[float, float] = (0.2, 0.8)) -> np.ndarray:
        """Soft [0, 1] membership of one lung; `shrink` < 1 collapses it toward `toward` (s, t)."""
        s, t = self.lung_frame(side, u, v)
        if shrink != 1.0:
            s, t = toward[0] + (s - toward[0]) / shrink, toward[1] + (t - toward[1]) / shrink
        dome = self.dome[SIDES.index(side)]
        apex = 0.32 * ((s - 0.45) / 0.55) ** 2
        base = 1.0 - dome * (1.0 - ((s - 0.45) / 0.55) ** 2)
        lateral = 1.0 - 0.06 * ((t - 0.6) / 0.6) ** 2
        margin = np.minimum(np.minimum(t - apex, base - t), np.minimum(s, lateral - s))
        return smoothstep(margin / 0.02 + 0.5)

    def lungs(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.maximum(self.lung("right", u, v), self.lung("left", u, v))

    def heart(self, u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
        cu, cv = self.heart_center
        half = 0.5 * self.heart_width * scale
        # more of the heart lies to the patient's left (the image's right)
        du = np.where(u < cu, (u - cu) / (0.8 * half), (u - cu) / (1.2 * half))
        dv = (v - cv) / self.heart_height
        r = np.abs(du) ** 2.3 + np.abs(dv) ** 2.0
        return smoothstep((1.0 - r) / 0.08 + 0.5)

    def body(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        shoulder = 0.5 - 0.06 * smoothstep((0.06 - v) / 0.06)
        r = (np.abs(u - 0.5) / shoulder) ** 6 + (np.abs(v - 0.5) / 0.5) ** 8
        return smoothstep((1.0 - r) / 0.05 + 0.5)


def sample_thorax(rng: np.random.Generator, rows: int, cols: int, heart_width: float | None = None) -> Thorax:
    """A patient-and-positioning draw: nothing sits at a fixed pixel location."""
    width = cols * rng.uniform(0.78, 0.9)
    height = rows * rng.uniform(0.84, 0.94)
    center = (cols * (0.5 + rng.uniform(-0.03, 0.03)), rows * (0.5 + rng.uniform(-0.02, 0.02)))
    return Thorax(
        rows=rows, cols=cols, center=center, size=(width, height), angle=float(np.deg2rad(rng.uniform(-3, 3))),
        heart_width=heart_width if heart_width is not None else Thorax.LUNG_SPAN * rng.uniform(0.38, 0.47),
        heart_center=(0.555 + rng.uniform(-0.035, 0.035), 0.66 + rng.uniform(-0.04, 0.04)),
        heart_height=rng.uniform(0.13, 0.17), dome=(rng.uniform(0.1, 0.2), rng.uniform(0.08, 0.18)),
        midline=0.5 + rng.uniform(-0.015, 0.015), rib_phase=rng.uniform(0.0, 1.0), rib_gap=rng.uniform(0.068, 0.08),
        lung_bottom=(rng.uniform(0.83, 0.87), rng.uniform(0.85, 0.89)),
    )


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    return np.exp(-((distance / half_width) ** 2)).astype(np.float32)


def _ribs(th: Thorax, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Ten posterior ribs (curving down laterally, with a cortical rim) and fainter anterior ribs."""
    d = np.abs(u - th.midline) / 0.42

    def comb(position: np.ndarray) -> np.ndarray:
        # distance to the nearest of ten bands spaced rib_gap apart, computed once for all ribs
        index = np.clip(np.round(position / th.rib_gap), 0, 9)
        return position - index * th.rib_gap

    offset = 0.06 + 0.5 * th.rib_phase * th.rib_gap
    posterior = comb(v - offset - 0.07 * d ** 2)
    anterior = comb(v - offset - 0.1 - 0.1 * (1.0 - d))
    ribs = _band(posterior, 0.011) - 0.5 * _band(posterior, 0.006) + 0.35 * _band(anterior, 0.009)
    return ribs * smoothstep((d - 0.12) / 0.1) * smoothstep((1.12 - d) / 0.05)


def _clavicles(th: Thorax, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    for sign in (-1.0, 1.0):
        a = (u - th.midline) * sign                      # distance from the midline on this side
        along = np.clip((a - 0.05) / 0.32, 0.0, 1.0)
        centre = 0.13 - 0.06 * along + 0.02 * np.sin(np.pi * along)
        out += _band(v - centre, 0.014) * smoothstep((a - 0.05) / 0.02) * smoothstep((0.4 - a) / 0.03)
    return out


def upsample(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((cols, rows), Image.BICUBIC))


def frontal_density(rng: np.random.Generator, th: Thorax) -> tuple[np.ndarray, np.ndarray]:
    """Brightness of the normal anatomy (air dark) and, separately, its lung markings (which a
    pneumothorax removes). Smooth anatomy is drawn at half resolution and upsampled: 4x cheaper."""
    u, v = th.grid(step=2)
    shape = u.shape
    body = th.body(u, v)
    lungs = th.lungs(u, v)
    heart = th.heart(u, v)
    mediastinum = (smoothstep((0.075 + 0.03 * v - np.abs(u - th.midline)) / 0.01)
                   * smoothstep((th.heart_center[1] - v) / 0.1))
    knob = smoothstep((0.035 - np.hypot(u - th.midline - 0.06, v - 0.24)) / 0.01)
    trachea = smoothstep((0.017 - np.abs(u - th.midline)) / 0.006) * smoothstep((0.3 - v) / 0.04)
    spine = smoothstep((0.045 - np.abs(u - th.midline)) / 0.01) * (0.8 + 0.2 * np.cos(v * 2 * np.pi * 14) ** 2)
    below_diaphragm = smoothstep((v - 0.8) / 0.1) * (1.0 - lungs)

    density = 0.04 + body * (0.46 + 0.05 * below_diaphragm + 0.03 * smooth_noise(rng, shape, 6))
    density -= lungs * 0.27 * (1.0 - 0.75 * heart)
    mediastinum = np.maximum(mediastinum, knob) * (1.0 - heart)
    density += body * (rng.uniform(0.1, 0.18) * heart + 0.13 * mediastinum + 0.05 * spine - 0.06 * trachea)
    density += body * rng.uniform(0.035, 0.06) * (_ribs(th, u, v) + 0.8 * _clavicles(th, u, v))
    # vascular markings: ridged noise, strongest toward the hila
    hilum_distance = np.minimum(np.hypot(u - th.midline + 0.12, v - 0.45), np.hypot(u - th.midline - 0.12, v - 0.45))
    ridges = np.clip(1.0 - np.abs(smooth_noise(rng, shape, 28)), 0.0, 1.0)
    markings = (0.02 + 0.035 * np.exp(-hilum_distance / 0.18)) * (ridges ** 3) + 0.01 * smooth_noise(rng, shape, 48)
    markings = upsample(lungs * markings, th.rows, th.cols)
    return upsample(density, th.rows, th.cols) + markings, markings


def lateral_density(rng: np.random.Generator, th: Thorax) -> np.ndarray:
    """A side view (no findings drawn): spine posterior, heart anterior, one lung field."""
    u, v = th.grid(step=2)
    shape = u.shape
    body = smoothstep((1.0 - ((u - 0.5) / 0.46) ** 4 - ((v - 0.5) / 0.5) ** 8) / 0.05 + 0.5)
    lung = smoothstep((1.0 - ((u - 0.5) / 0.36) ** 2 - ((v - 0.48) / 0.38) ** 2) / 0.08 + 0.5)
    heart = smoothstep((1.0 - ((u - 0.38) / 0.17) ** 2 - ((v - 0.68) / 0.16) ** 2) / 0.1 + 0.5)
    spine = smoothstep((0.05 - np.abs(u - 0.82 - 0.04 * v)) / 0.01) * (0.75 + 0.25 * np.cos(v * 2 * np.pi * 12) ** 2)
    density = 0.04 + body * (0.5 + 0.03 * smooth_noise(rng, shape, 6))
    density += body * (-0.22 * lung * (1.0 - 0.6 * heart) + 0.12 * heart + 0.12 * spine)
    density += lung * 0.02 * np.clip(1.0 - np.abs(smooth_noise(rng, shape, 24)), 0.0, 1.0) ** 3
    return upsample(density, th.rows, th.cols)


def expose(rng: np.random.Generator, density: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-image exposure: gain, offset, gamma, a heel-effect gradient and quantum noise, in [0, 1]."""
    gain, offset, gamma = rng.uniform([0.85, -0.04, 0.8], [1.15, 0.04, 1.25]).astype(np.float32)
    tilt = rng.uniform(-0.1, 0.1, size=2).astype(np.float32)
    # the heel effect scales exposure across the field; air stays saturated dark
    image = np.clip(density * (gain + tilt[0] * (u - 0.5) + tilt[1] * (v - 0.5)) + offset, 0.0, 1.0) ** gamma
    image = image + np.float32(rng.uniform(0.006, 0.018)) * rng.standard_normal(density.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)
