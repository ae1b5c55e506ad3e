"""Fakes for the guidance engine tests: clock, scripted predictor, synthetic frames, sources, recorder."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

from devices.base import EndOfStream, Frame, Source, SourceError, register_source
from devices.labels import ACTIONS, VIEW_LABELS, VIEWS
from edge_app.engine import ModelOutput


class FakeClock:
    """A clock that only moves when told to (for latency and slow-inference tests)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_output(view: str = "A4C", view_conf: float = 0.9, quality: float | dict = 0.3,
                action: str = "SLIDE_LEFT", action_conf: float = 0.8, distance: float = 1.5,
                ood: float = -6.0, confidence: float | None = None) -> ModelOutput:
    """A ModelOutput: `view` with probability `view_conf`, the same `action` toward every target.

    Args:
        quality: one value for every target, or {view: value} (others 0.1).
        distance: |pose offset| along the action's axis, normalized units (0 for HOLD).
    """
    v = len(VIEWS)
    probs = np.full(v + 1, (1 - view_conf) / v)
    probs[VIEW_LABELS.index(view)] = view_conf
    q = np.full(v, 0.1)
    if isinstance(quality, dict):
        for name, value in quality.items():
            q[VIEWS.index(name)] = value
    else:
        q[:] = quality
    a = ACTIONS.index(action)
    act = np.full((v, len(ACTIONS)), (1 - action_conf) / (len(ACTIONS) - 1))
    act[:, a] = action_conf
    pose = np.zeros((v, 5))
    if action != "HOLD":
        pose[:, a // 2] = distance if a % 2 == 0 else -distance
    return ModelOutput(view_probs=probs, quality=q, action_probs=act, pose_offset=pose, ood_score=ood,
                       confidence=confidence)


class ScriptedPredictor:
    """Returns `self.output` (or `script(image, call)`); can make the fake clock look slow."""

    name = "scripted"
    precision = "fp32"

    def __init__(self, output: ModelOutput | None = None, clock: FakeClock | None = None, delay_s: float = 0.0,
                 script: Callable[[np.ndarray, int], ModelOutput] | None = None, sleep_s: float = 0.0) -> None:
        self.output = output or make_output()
        self.clock = clock
        self.delay_s = delay_s
        self.sleep_s = sleep_s
        self.script = script
        self.calls = 0

    def predict(self, image: np.ndarray) -> ModelOutput:
        if self.clock is not None and self.delay_s:
            self.clock.advance(self.delay_s)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.calls += 1
        return self.script(image, self.calls - 1) if self.script else self.output


def make_scripted() -> ScriptedPredictor:
    """Factory for `pocus app --predictor helpers_engine:make_scripted` (confident, guiding)."""
    return ScriptedPredictor(make_output("A4C", 0.9, quality=0.3, action="ROTATE_CW"))


_GRID: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def us_image(t: float = 0.0, size: int = 96, seed: int = 0) -> np.ndarray:
    """A B-mode-like frame: speckle inside a 80 deg fan (apex top centre), a beating dark cavity.

    New speckle each `t`, so consecutive frames are never identical.
    """
    if size not in _GRID:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        r = np.hypot(yy, xx - size / 2)
        ang = np.degrees(np.arctan2(xx - size / 2, yy))
        _GRID[size] = (yy, xx, (r < 0.95 * size) & (np.abs(ang) < 40))
    yy, xx, fan = _GRID[size]
    rng = np.random.default_rng([seed, int(round(t * 1000))])
    speckle = rng.rayleigh(45.0, (size, size))
    radius = size * 0.16 * (1 + 0.15 * np.sin(2 * np.pi * 1.2 * t))
    cavity = np.hypot(yy - 0.55 * size, xx - size / 2) < radius
    img = np.where(fan & ~cavity, speckle, 0.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def noise_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """Uniform white noise: not an ultrasound image."""
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def checkerboard_image(size: int = 96, square: int = 12, lo: int = 40, hi: int = 200) -> np.ndarray:
    """A grey checkerboard (not saturated, not blank, not ultrasound)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.where(((yy // square) + (xx // square)) % 2 == 0, lo, hi).astype(np.uint8)


def texture_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """A natural-looking texture (smoothed noise stretched to 30..230), like a photo of a surface."""
    import cv2

    z = cv2.GaussianBlur(np.random.default_rng(seed).normal(size=(size, size)), (0, 0), 3)
    z = (z - z.min()) / (z.max() - z.min())
    return (30 + 200 * z).astype(np.uint8)


def lung_image(t: float = 0.0, size: int = 96) -> np.ndarray:
    """Lung-like B-mode: a fan with a bright pleural line and repeated A-lines, nothing else."""
    img = us_image(t, size) // 4
    for depth in (0.2, 0.4, 0.6, 0.8):
        row = int(depth * size)
        img[row:row + 2] = np.where(img[row:row + 2] > 0, 200, 0)
    return img


def frames(n: int, fps: float = 30.0, t0: float = 0.0, image: Callable[[float], np.ndarray] = us_image,
           start_index: int = 0) -> list[Frame]:
    """`n` frames at `fps` starting at time t0, images from `image(t)`."""
    return [Frame(image=image(t0 + i / fps), t=t0 + i / fps, index=start_index + i) for i in range(n)]


class ListSource(Source):
    """A finite source over given frames (EndOfStream at the end), optionally paced in real time."""

    name = "list"

    def __init__(self, items: Iterable[Frame], fps: float = 0.0, error_at: int | None = None) -> None:
        self.items = list(items)
        self.fps = fps
        self.error_at = error_at
        self.i = 0
        self._next = None

    def read(self, timeout: float | None = None) -> Frame | None:
        if self.error_at is not None and self.i == self.error_at:
            raise SourceError("fake stream disconnected: check the cable")
        if self.i >= len(self.items):
            raise EndOfStream("no more frames")
        if self.fps:
            now = time.monotonic()
            self._next = now if self._next is None else self._next
            if self._next > now:
                time.sleep(self._next - now)
            self._next += 1.0 / self.fps
        frame = self.items[self.i]
        self.i += 1
        return frame


class LiveFakeSource(Source):
    """An endless paced source of synthetic B-mode frames (for the CLI subprocess test)."""

    name = "fakeus"

    def __init__(self, fps: float = 30.0) -> None:
        self.fps = fps
        self.i = 0
        self._t0: float | None = None

    def read(self, timeout: float | None = None) -> Frame | None:
        if self._t0 is None:
            self._t0 = time.monotonic()
        due = self._t0 + self.i / self.fps
        delay = due - time.monotonic()
        if timeout is not None and delay > timeout:
            time.sleep(timeout)
            return None
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        frame = Frame(image=us_image(t - self._t0), t=t, index=self.i)
        self.i += 1
        return frame


def register_fake_source() -> None:
    """Make the spec `fakeus` (or `fakeus:FPS`) create a LiveFakeSource."""
    register_source("fakeus", lambda rest, **options: LiveFakeSource(float(rest) if rest else 30.0))


class FakeRecorder:
    """Collects what the engine records."""

    def __init__(self) -> None:
        self.items: list[tuple[Frame, dict]] = []
        self.closed = False

    def append(self, frame: Frame, extra: dict | None = None) -> None:
        if self.closed:
            raise RuntimeError("append after close")
        self.items.append((frame, dict(extra or {})))

    def close(self) -> None:
        self.closed = True
