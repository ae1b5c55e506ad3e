"""Test helpers for training: a tiny fake simulator probe with the real probe's API and label rules."""
from __future__ import annotations

import numpy as np

from devices.labels import OTHER, POSE_SCALE, VIEW_LABELS, VIEW_RADIUS, VIEWS, best_action, pose_distance

# Fixed target poses per view (mm / deg), far enough apart that views do not overlap.
TARGETS = {v: np.array([20.0 * i, -15.0 * i, 30.0 * i, 0.0, 5.0 * i]) for i, v in enumerate(VIEWS)}


class FakeProbe:
    """Like devices.sim.SimulatedProbe for training code: render(pose, t), labels(pose), sample_pose, target_pose.

    The image is a dark square with a bright disk whose position and radius depend on the pose, so a
    model can learn something in a few steps.
    """

    def __init__(self, patient_seed: int = 0, settings: dict | None = None, size: int = 32) -> None:
        self.seed, self.settings, self.size = patient_seed, dict(settings or {}), size

    def target_pose(self, view: str) -> np.ndarray:
        return TARGETS[view].copy()

    def sample_pose(self, rng: np.random.Generator, mode: str = "window") -> np.ndarray:
        return TARGETS[VIEWS[int(rng.integers(len(VIEWS)))]] + rng.normal(0, 3, 5) * POSE_SCALE

    def labels(self, pose: np.ndarray) -> dict:
        offsets = np.stack([TARGETS[v] - pose for v in VIEWS]).astype(np.float32)  # [V, 5]
        dist = pose_distance(offsets)
        nearest = int(np.argmin(dist))
        view = nearest if dist[nearest] <= VIEW_RADIUS else VIEW_LABELS.index(OTHER)
        return {"view": view, "quality": np.exp(-0.5 * dist ** 2).astype(np.float32),
                "pose_offset": offsets, "action": best_action(offsets).astype(np.int64), "acoustic": 1.0,
                "pose": np.asarray(pose, dtype=np.float64), "patient_seed": self.seed}

    def render(self, pose: np.ndarray, t: float = 0.0) -> tuple[np.ndarray, dict]:
        s = self.size
        z = np.asarray(pose) / POSE_SCALE
        yy, xx = np.mgrid[0:s, 0:s]
        cx, cy = s / 2 + 2.0 * z[0] % s, s / 2 + 2.0 * z[1] % s
        r = 3 + abs(z[2]) % (s / 4)
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 200, 30 + 10 * (z[4] % 5)).astype(np.uint8)
        return img, self.labels(pose)


def fake_factory(seed: int, settings: dict, size: int) -> FakeProbe:
    """Probe factory with the signature training.data expects (module level: picklable for workers)."""
    return FakeProbe(seed, settings, size)
