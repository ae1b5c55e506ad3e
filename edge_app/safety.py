"""Safety gates of the guidance engine that look at the image itself (no model needed).

The engine withholds the instruction, and says why, whenever one of these holds:

- no new frame for longer than the stale timeout (checked by the engine on its clock);
- frozen image: consecutive frames (near-)identical for longer than ~1 s (a paused scanner, a
  stuck capture card), measured on a 64x64 area-averaged thumbnail so video-compression noise
  does not count as motion; not on a near-black frame (> 90 % dark: a still probe over lung);
- blank or saturated image: nothing brighter than near-black, a uniform field of any grey, or a
  large share of clipped white;
- not ultrasound-like: a cardiac phased-array B-mode image is mostly dark (the corners outside the
  fan, blood pools, shadows) with sparse bright tissue. Pure noise, photos, checkerboards and most
  screens of text fail this cheap check before the model is even asked; the model's own OOD score
  (energy, see `edge_app.engine.BundlePredictor`) catches the rest.

Thresholds are module constants with their reason; `check_image` takes overrides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Human-readable reasons shown as "Guidance unavailable: <reason>" (GuidanceState.reasons).
REASON_WAITING = "waiting for the first frame"
REASON_STALE = "no new frame for {seconds:.1f} s"
REASON_ENDED = "the source has no more frames"
REASON_SOURCE_ERROR = "source error: {error}"
REASON_FROZEN = "frozen image"
REASON_BLANK = "image blank or saturated"
REASON_OOD = "input does not look like a cardiac view"
REASON_UNSURE = "model unsure"
REASON_SLOW = "inference too slow"
REASON_ENGINE_ERROR = "engine error: {error}"

# A pixel this dark or darker counts as "black" (outside the fan, blood, shadow); 8-bit levels.
DARK_LEVEL = 20
# B-mode sector images: the two corners outside a 75-90 deg fan alone are ~20-30 % of the frame.
MIN_DARK_FRACTION = 0.15
# Median grey of a B-mode frame is low (mostly blood/background); photos and noise sit near 128.
MAX_MEDIAN = 110
# Blank: the 99th percentile is still near-black, or the frame is one flat grey (std below this).
BLANK_P99 = 12
BLANK_STD = 2.0
# Saturated: this share of pixels at >= 250 means gain far too high or a white screen.
SATURATED_LEVEL = 250
SATURATED_FRACTION = 0.25
# Frozen: mean absolute difference between consecutive 64x64 thumbnails below this (grey levels).
FROZEN_THUMB = 64
# ... judged only on frames with tissue in them: a still probe over lung or a rib shows a near-black
# frame (only the skin line moves, by less than capture-card noise); calling that "frozen" withholds
# the very instruction that would bring the probe back to the heart. Above this dark share it is not
# a frozen-image verdict; the model then says "no heart here".
FROZEN_MAX_DARK_FRACTION = 0.9
_LEVELS = np.arange(256, dtype=np.float64)
_LEVELS_SQ = _LEVELS ** 2


@dataclass(frozen=True)
class ImageCheck:
    """Cheap statistics of one frame and the verdicts drawn from them."""

    median: float
    std: float
    dark_fraction: float
    saturated_fraction: float
    blank: bool
    saturated: bool
    ultrasound_like: bool


def check_image(image: np.ndarray, *, dark_level: int = DARK_LEVEL, min_dark_fraction: float = MIN_DARK_FRACTION,
                max_median: float = MAX_MEDIAN, blank_p99: float = BLANK_P99, blank_std: float = BLANK_STD,
                saturated_level: int = SATURATED_LEVEL, saturated_fraction: float = SATURATED_FRACTION) -> ImageCheck:
    """Blank / saturated / ultrasound-likeness verdicts for a uint8 [H, W] frame.

    Works on the histogram of a strided subsample (about 64x64 pixels, raw values kept), so it
    costs tens of microseconds on any frame size.

    Args:
        image: uint8 [H, W] frame.
        dark_level, min_dark_fraction, max_median: ultrasound-likeness (see module constants).
        blank_p99, blank_std: blank-frame limits.
        saturated_level, saturated_fraction: saturation limits.

    Returns:
        The ImageCheck.
    """
    step = max(1, min(image.shape) // 64)
    px = image[::step, ::step]
    hist = np.bincount(px.ravel(), minlength=256)     # [256] counts; every statistic below reads it
    cdf = np.cumsum(hist)
    n = float(cdf[-1])
    median = float(np.searchsorted(cdf, 0.5 * n))
    p99 = float(np.searchsorted(cdf, 0.99 * n))
    mean = float(hist @ _LEVELS) / n
    std = math.sqrt(max(float(hist @ _LEVELS_SQ) / n - mean * mean, 0.0))
    dark = float(cdf[dark_level]) / n
    sat = float(cdf[-1] - cdf[saturated_level - 1]) / n
    blank = p99 <= blank_p99 or std < blank_std
    saturated = sat >= saturated_fraction
    like = dark >= min_dark_fraction and median <= max_median
    return ImageCheck(median=median, std=std, dark_fraction=dark, saturated_fraction=sat,
                      blank=blank, saturated=saturated, ultrasound_like=like)


class FrozenDetector:
    """How long the image has stayed (nearly) the same, on the caller's clock.

    Args:
        max_diff: mean absolute difference (grey levels) between consecutive 64x64 area-averaged
            thumbnails at or below which two frames count as the same.
    """

    def __init__(self, max_diff: float) -> None:
        if max_diff < 0:
            raise ValueError(f"frozen-frame threshold must be >= 0 grey levels, got {max_diff}")
        self.max_diff = float(max_diff)
        self._prev: np.ndarray | None = None
        self._since = 0.0
        self.last_diff = float("nan")

    def reset(self) -> None:
        """Forget the previous frame."""
        self._prev = None

    def update(self, image: np.ndarray, t: float) -> float:
        """Add the frame seen at time `t`; returns for how many seconds the image has not changed."""
        thumb = cv2.resize(image, (FROZEN_THUMB, FROZEN_THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
        if self._prev is None or t < self._since:
            self.last_diff = float("nan")
            self._since = t
        else:
            self.last_diff = float(np.mean(np.abs(thumb - self._prev)))
            if self.last_diff > self.max_diff:
                self._since = t
        self._prev = thumb
        return t - self._since


def perturbations(image: np.ndarray) -> list[np.ndarray]:
    """The image and seven small changes a scanner or a hand makes (gain up and down, gamma, a 5 %
    shift either way, a 10 % zoom, blur): a quality estimate that holds under all of them is more
    often right (EngineConfig.capture_check_slack)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    dx = max(1, round(0.05 * w))
    left, right = np.zeros_like(img), np.zeros_like(img)
    right[:, dx:], left[:, :-dx] = img[:, :-dx], img[:, dx:]
    ch, cw = int(h * 0.9), int(w * 0.9)
    y, x = (h - ch) // 2, (w - cw) // 2
    f = img.astype(np.float32)
    return [img, np.clip(f * 1.2, 0, 255).astype(np.uint8), (f * 0.8).astype(np.uint8),
            (255 * (f / 255.0) ** 1.3).astype(np.uint8), right, left,
            cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA), cv2.GaussianBlur(img, (5, 5), 1.0)]
