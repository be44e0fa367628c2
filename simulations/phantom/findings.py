"""Phantom findings: which ones a study has (with region and wording cues) and how each is drawn, with its mask."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from shared_models.vocab import CHEXPERT_LABELS, ZONE_ATLAS

from .anatomy import SIDES, Thorax, smooth_noise, smoothstep


@dataclass
class Finding:
    """One abnormality of a study: an OBSERVATIONS name, a REGIONS name (or None) and how it looks."""

    finding: str
    region: str | None
    hedged: bool = False                              # the report words it with uncertainty
    detail: dict = field(default_factory=dict)        # side, size, severity, device kind, pneumonia ...


# CheXpert labels a finding makes true (Pneumonia comes from the consolidation's detail).
LABELS_OF = {
    "pleural_effusion": ("Pleural Effusion",),
    "consolidation": ("Consolidation", "Lung Opacity"),
    "pneumothorax": ("Pneumothorax",),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "cardiomegaly": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "atelectasis": ("Atelectasis", "Lung Opacity"),
    "edema": ("Edema", "Lung Opacity"),
    "support_device": ("Support Devices",),
}
ZONES = [f"{side}_{level}_zone" for side in SIDES for level in ("upper", "mid", "lower")]


def labels_of(finding: Finding) -> tuple[str, ...]:
    extra = ("Pneumonia",) if finding.detail.get("pneumonia") else ()
    return LABELS_OF[finding.finding] + extra


def truth_labels(findings: list[Finding]) -> dict[str, float]:
    """The study's true CheXpert labels (1.0 / 0.0); No Finding ignores support devices, as CheXpert does."""
    present = {label for f in findings for label in labels_of(f)}
    labels = {name: float(name in present) for name in CHEXPERT_LABELS}
    labels["No Finding"] = float(not (present - {"Support Devices"}))
    return labels


def _zone(rng: np.random.Generator, levels: tuple[str, ...], weights: tuple[float, ...]) -> str:
    level = rng.choice(levels, p=np.asarray(weights) / sum(weights))
    return f"{rng.choice(SIDES)}_{level}_zone"


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """Independent draws per finding type (about a third of studies come out normal)."""
    findings: list[Finding] = []

    def hedge() -> bool:
        return bool(rng.random() < 0.15)

    if rng.random() < 0.2:
        sides = list(SIDES) if rng.random() < 0.3 else [str(rng.choice(SIDES))]
        for side in sides:
            findings.append(Finding("pleural_effusion", f"{side}_costophrenic_angle", hedge(),
                                    {"side": side, "size": str(rng.choice(["small", "small", "moderate", "large"]))}))
    if rng.random() < 0.16:
        findings.append(Finding("consolidation", _zone(rng, ("upper", "mid", "lower"), (1, 2, 3)), hedge(),
                                {"pneumonia": bool(rng.random() < 0.6), "pneumonia_hedged": bool(rng.random() < 0.5)}))
    if rng.random() < 0.08:
        side, size = str(rng.choice(SIDES)), str(rng.choice(["small", "small", "moderate"]))
        findings.append(Finding("pneumothorax", f"{side}_apex" if size == "small" else f"{side}_lung", hedge(),
                                {"side": side, "size": size}))
    if rng.random() < 0.12:
        kind = "mass" if rng.random() < 0.25 else "nodule"
        findings.append(Finding(kind, _zone(rng, ("upper", "mid", "lower"), (1, 1, 1)), hedge()))
    if rng.random() < 0.18:
        findings.append(Finding("cardiomegaly", "heart", hedge(), {"severity": str(rng.choice(["mild", "moderate"]))}))
    if rng.random() < 0.16:
        findings.append(Finding("atelectasis", _zone(rng, ("mid", "lower"), (1, 3)), hedge()))
    if rng.random() < 0.1:
        findings.append(Finding("edema", None, hedge(), {"severity": str(rng.choice(["mild", "moderate"]))}))
    if rng.random() < 0.15:
        kind = str(rng.choice(["endotracheal_tube", "central_line", "enteric_tube"]))
        region = {"endotracheal_tube": "trachea", "central_line": "mediastinum"}.get(kind)
        findings.append(Finding("support_device", region, False, {"kind": kind, "side": str(rng.choice(SIDES))}))
    return findings


def heart_width_for(rng: np.random.Generator, findings: list[Finding]) -> float:
    """Heart width in thorax units: a cardiothoracic ratio of 0.39-0.50, or 0.52-0.62 with cardiomegaly
    (a narrow gap, so telling them apart takes measuring the heart against the thorax)."""
    cardiomegaly = [f for f in findings if f.finding == "cardiomegaly"]
    if not cardiomegaly:
        return Thorax.LUNG_SPAN * rng.uniform(0.39, 0.5)
    low, high = (0.52, 0.56) if cardiomegaly[0].detail["severity"] == "mild" else (0.56, 0.62)
    return Thorax.LUNG_SPAN * rng.uniform(low, high)


@dataclass
class Canvas:
    """What a finding is drawn on: the thorax, its pixel grid, the anatomy and the normal lung markings."""

    thorax: Thorax
    u: np.ndarray
    v: np.ndarray
    density: np.ndarray
    markings: np.ndarray

    def __post_init__(self):
        self._lungs: dict[str, np.ndarray] = {}

    def lung(self, side: str, **collapse) -> np.ndarray:
        if collapse:
            return self.thorax.lung(side, self.u, self.v, **collapse)
        if side not in self._lungs:      # several findings share a lung: draw it once
            self._lungs[side] = self.thorax.lung(side, self.u, self.v)
        return self._lungs[side]

    def point_in(self, rng: np.random.Generator, region: str, margin: float) -> tuple[float, float]:
        """A random point of the region's atlas box inside its lung, preferably `margin` from the
        lung's edge (the margin halves every 50 misses, so a big lesion in a small zone still fits)."""
        side = "right" if region.startswith("right") else "left"
        x1, y1, x2, y2 = ZONE_ATLAS[region]
        for attempt in range(300):
            pu, pv = rng.uniform(x1 + 0.02, x2 - 0.02), rng.uniform(y1 + 0.02, y2 - 0.02)
            reach = margin * 0.5 ** (attempt // 50)
            probe_u, probe_v = pu + reach * np.array([0, 1, -1, 0, 0]), pv + reach * np.array([0, 0, 0, 1, -1])
            if self.thorax.lung(side, probe_u, probe_v).min() > 0.9:
                break
        return float(pu), float(pv)

    def round_distance(self, pu: float, pv: float) -> np.ndarray:
        """Distance to (pu, pv) in u units, isotropic in pixels."""
        aspect = self.thorax.size[1] / self.thorax.size[0]
        return np.hypot(self.u - pu, (self.v - pv) * aspect)


def _pleural_effusion(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    side = f.detail["side"]
    lung = c.lung(side)
    s, t = c.thorax.lung_frame(side, c.u, c.v)
    height = {"small": (0.09, 0.14), "moderate": (0.16, 0.26), "large": (0.28, 0.4)}[f.detail["size"]]
    level = 1.0 - rng.uniform(*height) * (0.55 + 0.45 * np.clip(s, 0, 1))   # meniscus: higher laterally
    fluid = smoothstep((t - level) / 0.05) * lung
    c.density += rng.uniform(0.14, 0.24) * fluid * (0.9 + 0.1 * smooth_noise(rng, c.u.shape, 12))
    return (t > level) & (lung > 0.5)


def _consolidation(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    side = f.region.split("_")[0]
    radius = rng.uniform(0.06, 0.12)
    pu, pv = c.point_in(rng, f.region, radius * 0.5)
    field = np.exp(-(c.round_distance(pu, pv) / radius) ** 2) + 0.3 * smooth_noise(rng, c.u.shape, 20)
    lung = c.lung(side)
    patch = smoothstep((field - 0.45) / 0.2) * lung
    c.density += rng.uniform(0.1, 0.2) * patch * (0.75 + 0.25 * smooth_noise(rng, c.u.shape, 40))
    mask = (field > 0.55) & (lung > 0.5)
    return mask if mask.any() else (c.round_distance(pu, pv) < radius * 0.5) & (lung > 0.5)


def _pneumothorax(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    side = f.detail["side"]
    shrink = rng.uniform(0.86, 0.92) if f.detail["size"] == "small" else rng.uniform(0.72, 0.82)
    lung, collapsed = c.lung(side), c.lung(side, shrink=shrink, toward=(0.25, 0.9))
    rim = np.clip(lung - collapsed, 0.0, 1.0)
    pleural_line = 4.0 * collapsed * (1.0 - collapsed) * lung
    c.density -= rim * (c.markings + rng.uniform(0.04, 0.08))     # lucent, no lung markings
    c.density += rng.uniform(0.03, 0.06) * pleural_line
    return rim > 0.5


def _round_lesion(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    radius = rng.uniform(0.045, 0.075) if f.finding == "mass" else rng.uniform(0.016, 0.032)
    pu, pv = c.point_in(rng, f.region, radius * 1.2)
    d = c.round_distance(pu, pv)
    angle = np.arctan2(c.v - pv, c.u - pu)
    edge = radius * (1.0 + 0.15 * np.sin(rng.integers(3, 7) * angle + rng.uniform(0, 2 * np.pi)))
    amplitude = rng.uniform(0.1, 0.18) if f.finding == "mass" else rng.uniform(0.09, 0.16)
    c.density += amplitude * smoothstep((edge - d) / (0.3 * radius))
    f.detail["size_fraction"] = 2 * radius          # diameter in thorax widths, for the report's size in mm
    return d < edge


def _cardiomegaly(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    return c.thorax.heart(c.u, c.v) > 0.5       # the enlarged heart is already part of the anatomy


def _atelectasis(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    side = f.region.split("_")[0]
    half_length, thickness = rng.uniform(0.05, 0.09), rng.uniform(0.012, 0.022)
    pu, pv = c.point_in(rng, f.region, half_length * 0.6)
    angle = np.deg2rad(rng.uniform(-18, 18))
    du, dv = c.u - pu, c.v - pv
    along = np.clip(du * np.cos(angle) + dv * np.sin(angle), -half_length, half_length)
    dist = np.hypot(du - along * np.cos(angle), dv - along * np.sin(angle))
    lung = c.lung(side)
    band = smoothstep((thickness - dist) / (0.5 * thickness) + 0.5) * lung
    c.density += rng.uniform(0.1, 0.18) * band
    return (band > 0.5) & (lung > 0.5)


def _edema(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    mid = c.thorax.midline
    hila = np.minimum(np.hypot(c.u - mid + 0.13, c.v - 0.47), np.hypot(c.u - mid - 0.13, c.v - 0.47))
    weight = np.exp(-hila / rng.uniform(0.12, 0.2))
    lungs = np.maximum(c.lung("right"), c.lung("left"))
    reticular = np.clip(1.0 - np.abs(smooth_noise(rng, c.u.shape, 40)), 0.0, 1.0) ** 2
    haze = weight * (0.5 + 0.5 * reticular)
    amplitude = rng.uniform(0.04, 0.07) if f.detail["severity"] == "mild" else rng.uniform(0.07, 0.11)
    c.density += amplitude * haze * lungs
    return (haze > 0.35) & (lungs > 0.5)


def _device_path(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    """Control points (u, v) of the tube or line."""
    mid = c.thorax.midline + rng.uniform(-0.01, 0.01)
    kind, sign = f.detail["kind"], (-1.0 if f.detail["side"] == "right" else 1.0)
    if kind == "endotracheal_tube":
        return np.array([[mid, 0.02], [mid + rng.uniform(-0.01, 0.01), 0.12], [mid, rng.uniform(0.18, 0.26)]])
    if kind == "central_line":
        tip = [mid - 0.04, rng.uniform(0.3, 0.4)]
        return np.array([[mid + sign * 0.2, 0.03], [mid + sign * 0.12, 0.14], [mid - 0.03, 0.2], tip])
    return np.array([[mid, 0.02], [mid + 0.01, 0.45], [mid + 0.03, 0.82], [mid + rng.uniform(0.12, 0.2), 0.9]])


def _support_device(rng: np.random.Generator, c: Canvas, f: Finding) -> np.ndarray:
    points = _device_path(rng, c, f)
    # a smooth curve through the control points (quadratic B-spline-like averaging of a dense polyline)
    segments = [np.linspace(a, b, 40, endpoint=False) for a, b in zip(points[:-1], points[1:])]
    dense = np.concatenate(segments + [points[-1:]])
    kernel = np.ones(25) / 25
    smooth = np.stack([np.convolve(np.pad(dense[:, k], 12, mode="edge"), kernel, mode="valid") for k in (0, 1)], 1)
    x, y = c.thorax.to_pixels(smooth[:, 0], smooth[:, 1])
    image = Image.new("L", (c.thorax.cols, c.thorax.rows), 0)
    width = max(1, int(round(rng.uniform(0.003, 0.008) * c.thorax.rows)))
    ImageDraw.Draw(image).line(list(zip(x.tolist(), y.tolist())), fill=255, width=width, joint="curve")
    line = np.asarray(image, dtype=np.float32) / 255.0
    c.density += rng.uniform(0.12, 0.3) * line
    return line > 0.5


RENDERERS: dict[str, Callable[[np.random.Generator, Canvas, Finding], np.ndarray]] = {
    "pleural_effusion": _pleural_effusion,
    "consolidation": _consolidation,
    "pneumothorax": _pneumothorax,
    "nodule": _round_lesion,
    "mass": _round_lesion,
    "cardiomegaly": _cardiomegaly,
    "atelectasis": _atelectasis,
    "edema": _edema,
    "support_device": _support_device,
}


def draw_findings(rng: np.random.Generator, canvas: Canvas, findings: list[Finding]) -> list[np.ndarray]:
    """Draw every finding onto `canvas.density` (in place); one bool mask per finding, same order."""
    return [RENDERERS[f.finding](rng, canvas, f) for f in findings]
