"""Image augmentations a real scanner would produce (numpy/OpenCV, seedable, uint8 in and out).

Each transform is a small class: `randomize(rng, shape)` draws its parameters, `apply(image, params)`
applies them, and `__call__(image, rng)` does both (MONAI style), so a test can check one draw.
`Augment` chains them, each with its own probability. No flips: the index marker fixes left/right,
and a mirrored image would need mirrored actions.

Geometry assumption: the sector apex is at the top centre (scanner convention and the simulator's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


class Transform:
    """Base: draw parameters with `randomize`, apply them with `apply`."""

    def randomize(self, rng: np.random.Generator, shape: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.randomize(rng, image.shape))


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)


class GainContrast(Transform):
    """Overall gain (brightness offset) and contrast (slope): the scanner's gain knob."""

    def __init__(self, gain: float = 25.0, contrast: tuple[float, float] = (0.75, 1.3)) -> None:
        self.gain, self.contrast = gain, contrast

    def randomize(self, rng, shape):
        return {"offset": rng.uniform(-self.gain, self.gain), "slope": rng.uniform(*self.contrast)}

    def apply(self, image, params):
        return _u8(image.astype(np.float32) * params["slope"] + params["offset"])


class Gamma(Transform):
    """Gamma curve: what a different dynamic range (log compression) looks like on screen."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5)) -> None:
        self.gamma = gamma

    def randomize(self, rng, shape):
        return {"gamma": float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))}

    def apply(self, image, params):
        lut = _u8(255.0 * (np.arange(256) / 255.0) ** params["gamma"])
        return cv2.LUT(image, lut)


class Blur(Transform):
    """Gaussian blur: a softer probe, lower frequency, or a video capture path."""

    def __init__(self, sigma_px: tuple[float, float] = (0.4, 1.2)) -> None:
        self.sigma_px = sigma_px

    def randomize(self, rng, shape):
        return {"sigma_px": rng.uniform(*self.sigma_px)}

    def apply(self, image, params):
        return cv2.GaussianBlur(image, (0, 0), params["sigma_px"])


class Noise(Transform):
    """Additive electronic noise plus multiplicative speckle-like noise."""

    def __init__(self, sigma: tuple[float, float] = (2.0, 10.0), speckle: tuple[float, float] = (0.0, 0.15)) -> None:
        self.sigma, self.speckle = sigma, speckle

    def randomize(self, rng, shape):
        return {"add": rng.normal(0, rng.uniform(*self.sigma), shape).astype(np.float32),
                "mul": (1 + rng.normal(0, rng.uniform(*self.speckle), shape)).astype(np.float32)}

    def apply(self, image, params):
        return _u8(image.astype(np.float32) * params["mul"] + params["add"])


class Jpeg(Transform):
    """JPEG compression artefacts (screen capture, DICOM lossy export)."""

    def __init__(self, quality: tuple[int, int] = (25, 90)) -> None:
        self.quality = quality

    def randomize(self, rng, shape):
        return {"quality": int(rng.integers(self.quality[0], self.quality[1] + 1))}

    def apply(self, image, params):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, params["quality"]])
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else image


class PartialShadow(Transform):
    """A dark wedge from the apex (rib or lung shadow over part of the sector)."""

    def __init__(self, width_deg: tuple[float, float] = (5.0, 25.0), strength: tuple[float, float] = (0.3, 0.9)) -> None:
        self.width_deg, self.strength = width_deg, strength

    def randomize(self, rng, shape):
        return {"center_deg": rng.uniform(-40, 40), "width_deg": rng.uniform(*self.width_deg),
                "strength": rng.uniform(*self.strength), "start": rng.uniform(0.05, 0.5)}

    def apply(self, image, params):
        h, w = image.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = np.degrees(np.arctan2(xx - w / 2, yy + 1e-3))
        r = np.hypot(xx - w / 2, yy) / h
        edge = np.clip(1 - np.abs(angle - params["center_deg"]) / (params["width_deg"] / 2), 0, 1)
        mask = np.clip(edge * 3, 0, 1) * (r > params["start"])
        return _u8(image * (1 - params["strength"] * mask))


class Overlay(Transform):
    """Scanner screen furniture around the sector: text, a depth scale, a marker dot, an ECG trace."""

    WORDS = ("CARDIAC", "3.5MHz", "MI 1.2", "TIs 0.4", "FR 42Hz", "G 55", "DR 60", "P Adult", "2D", "HR 72")

    def randomize(self, rng, shape):
        return {"words": [str(rng.choice(self.WORDS)) for _ in range(int(rng.integers(1, 5)))],
                "corner": int(rng.integers(0, 2)), "level": int(rng.integers(120, 256)),
                "ecg": bool(rng.random() < 0.5), "ecg_phase": rng.uniform(0, 2 * np.pi),
                "scale": bool(rng.random() < 0.6), "dot": bool(rng.random() < 0.6)}

    def apply(self, image, params):
        out = image.copy()
        h, w = out.shape
        font_scale = max(h / 400.0, 0.22)
        line = max(int(round(h / 18)), 6)
        x0 = 2 if params["corner"] == 0 else int(w * 0.72)
        for i, word in enumerate(params["words"]):
            cv2.putText(out, word, (x0, line * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                        params["level"], 1, cv2.LINE_AA)
        if params["scale"]:  # depth ticks on the right edge
            for y in range(line, h - 2, line):
                cv2.line(out, (w - 4, y), (w - 1, y), params["level"], 1)
        if params["dot"]:  # index marker dot beside the sector apex, on the marker (right) side
            cv2.circle(out, (int(w * 0.62), max(line // 2, 2)), max(h // 90, 1), params["level"], -1)
        if params["ecg"]:  # ECG trace along the bottom
            xs = np.arange(w)
            beat = np.sin(xs / w * 6 * np.pi + params["ecg_phase"])
            ys = (h - line + (line / 3) * np.where(beat > 0.97, -3.0, 0.2 * beat)).astype(np.int32)
            cv2.polylines(out, [np.stack([xs, ys], 1).astype(np.int32)], False, params["level"], 1)
        return out


class ShiftScale(Transform):
    """Small zoom and shift: a different screen crop or depth setting of the same anatomy."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.04) -> None:
        self.scale, self.shift = scale, shift

    def randomize(self, rng, shape):
        return {"scale": rng.uniform(*self.scale), "dx": rng.uniform(-self.shift, self.shift),
                "dy": rng.uniform(-self.shift, self.shift / 2)}

    def apply(self, image, params):
        h, w = image.shape
        s = params["scale"]
        m = np.float32([[s, 0, (1 - s) * w / 2 + params["dx"] * w], [0, s, params["dy"] * h]])
        return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


@dataclass
class Augment:
    """Chain of scanner-like augmentations, each applied with its own probability.

    Args:
        p: probability of each transform (one number for all; 0 disables augmentation).
    """

    p: float = 0.4

    def __post_init__(self) -> None:
        self.transforms: list[Transform] = [ShiftScale(), GainContrast(), Gamma(), PartialShadow(), Blur(),
                                            Noise(), Overlay(), Jpeg()]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment a uint8 [H, W] image with randomness from `rng` (same rng state -> same output)."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"augment needs a uint8 [H, W] image, got {image.shape} {image.dtype}")
        for t in self.transforms:
            if rng.random() < self.p:
                image = t(image, rng)
        return np.ascontiguousarray(image)
