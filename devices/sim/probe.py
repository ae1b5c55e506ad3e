"""`SimulatedProbe`: a probe on a simulated patient, honouring the `Source` contract, with ground truth.

Labels (what the model learns, one definition for training and evaluation):
    pose_offset  float32 [5 views, 5 axes]  target - current (mm, deg; rotation wrapped to [-180, 180)); the
                 target is the view's anatomical pose, or the best window near it when rib shadow costs
                 that pose too much image quality (SimulatedProbe._best_window_targets)
    action       int64 [5]   devices.labels.best_action(pose_offset, quality): HOLD within HOLD_RADIUS
                             if the quality is good (QUALITY_GOOD), always within HOLD_RADIUS_MIN
    quality      float32 [5] exp(-0.5 * plane_distance^2) * acoustic, where plane_distance compares the
                 cut through the heart with the target's (SimulatedProbe.plane_distance), not the probe
                 pose on the skin: a slide that a tilt undoes shows the same image and gets the same quality
    acoustic     float       visible_heart * depth_factor * gain_factor * range_factor, where
                 visible_heart = fraction of the heart samples in the sector (fixed 24 x 48 polar grid,
                     independent of the output size) with no bone or air in front of them on their
                     scan line (rib and lung shadow), 0 when no heart is in the sector; scan lines
                     weighted cos(90 deg x angle / half sector): a shadow at the sector's edge costs
                     little, one on the centre line a lot (Renderer.line_weight);
                 depth_factor = 1 for depth in [130, 220] mm, falling linearly to 0 at 80 mm (heart cut
                     off) and to 0.5 at 300 mm (heart small);
                 gain_factor = 1 for |gain_db| <= 10, exp(-0.5 ((|gain_db| - 10) / 8)^2) beyond;
                 range_factor = 1 for dynamic_range_db in [40, 80], exp(-0.5 (excess / 15)^2) beyond.
    view         int  index in VIEW_LABELS of the nearest target if its pose_distance <= VIEW_RADIUS
                 and acoustic >= 0.3, else the index of OTHER
    pose         float64 [5], patient_seed int, phase float (cardiac phase 0..1, 0 = end-diastole)
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from devices.base import Frame, Source, SourceError
from devices.labels import (ACTIONS, OTHER, POSE_SCALE, VIEW_LABELS, VIEW_RADIUS, VIEWS, action_delta, best_action,
                            pose_distance, view_index)
from devices.sim.anatomy import Anatomy, Patient, make_patient
from devices.sim.pose import clip_pose, pose_matrix, probe_axes, wrap_offset
from devices.sim.render import Renderer, ScanSettings

WINDOWS: dict[str, tuple[str, ...]] = {
    "parasternal": ("PLAX", "PSAX"),
    "apical": ("A4C", "A2C"),
    "subcostal": ("SC4C",),
}
WINDOW_OF = {v: w for w, views in WINDOWS.items() for v in views}
SAMPLE_MODES = ("near", "window", "random")
_MIN_ACOUSTIC_FOR_VIEW = 0.3
# One unit of image-plane mismatch (see plane_distance): turning the imaging plane or beam by this much,
PLANE_ANGLE_DEG = 10.0
# moving the aimed heart point this far out of the imaging plane,
PLANE_OFFSET_MM = 10.0
# or seeing it this far off the sector's centre line.
CENTRE_ANGLE_DEG = 10.0
# A view's target is the best window near its anatomical pose (SimulatedProbe._best_window_targets):
# searched when the anatomical pose's image quality over the cardiac cycle is under this (rib shadow:
# about 40 % of the patients' PSAX, a few per cent of the other views),
TARGET_SEARCH_BELOW = 0.9
# in coordinate steps of these sizes (normalized pose units, coarse to fine),
TARGET_SEARCH_STEPS = (0.5, 0.25)
# no farther than this from the anatomical pose (inside the near zone: the same view, one small move).
# Cost (2-core CPU): building a patient takes ~37 ms instead of ~10 (mean of 40 patients; ~25 ms when
# no view is searched); rendering a training patient's 32 frames ~0.18 s instead of ~0.15.
TARGET_SEARCH_RADIUS = 1.0


class SimSpecError(SourceError, ValueError):
    """A bad `sim:` spec or simulator option."""


def settings_factor(settings: ScanSettings) -> float:
    """Depth, gain and dynamic-range part of the acoustic factor (see the module docstring)."""
    d = settings.depth_mm
    if d < 130.0:
        depth = max(0.0, (d - 80.0) / 50.0)
    elif d > 220.0:
        depth = 1.0 - 0.5 * min(1.0, (d - 220.0) / 80.0)
    else:
        depth = 1.0
    g = abs(settings.gain_db)
    gain = 1.0 if g <= 10.0 else math.exp(-0.5 * ((g - 10.0) / 8.0) ** 2)
    dr = settings.dynamic_range_db
    excess = max(0.0, 40.0 - dr, dr - 80.0)
    rng_f = math.exp(-0.5 * (excess / 15.0) ** 2)
    return depth * gain * rng_f


class SimulatedProbe(Source):
    """A phased-array probe on a seeded simulated patient (the embedded default source).

    Args:
        patient_seed: which patient (non-negative integer); same seed, same patient.
        settings: ScanSettings (default: 160 mm, 80 deg, 128 px).
        start_pose: initial pose [5] (see devices/sim/pose.py); default: the target of start_view.
        start_view: view whose target is the initial pose when start_pose is None.
        fps: frame rate of `read`.
        realtime: pace `read` at fps on the wall clock; else frames come as fast as asked and the
            simulated time is index / fps (deterministic).

    Raises:
        ValueError: bad seed, view, fps or pose.
    """

    def __init__(self, patient_seed: int = 0, settings: ScanSettings | None = None,
                 start_pose: np.ndarray | None = None, start_view: str = "A4C", fps: float = 30.0,
                 realtime: bool = True) -> None:
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0.0 < fps <= 1000.0:
            raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
        self.patient: Patient = make_patient(patient_seed)
        self.anatomy = Anatomy(self.patient)
        if settings is not None and not isinstance(settings, ScanSettings):
            raise ValueError(f"settings must be a ScanSettings, got {type(settings).__name__}")
        anatomical = np.stack([self.anatomy.targets[v] for v in VIEWS])         # [V, 5]
        self._aims = np.stack([self.anatomy.aims[v] for v in VIEWS])            # [V, 3] mm
        self._target_axes = np.stack([probe_axes(t, self.patient.chest_radius_mm)[1] for t in anatomical])
        offset_rng = np.random.default_rng([self.patient.seed, 77])
        self._speckle_offset = offset_rng.uniform(0.0, 64.0, 3)
        self._settings = settings or ScanSettings()
        self._renderer = Renderer(self.anatomy, self._settings, self._speckle_offset)
        default_renderer = (self._renderer if self._settings == ScanSettings()
                            else Renderer(self.anatomy, ScanSettings(), self._speckle_offset))
        self._targets = self._best_window_targets(anatomical, default_renderer)  # [V, 5]
        self._settings_factor = settings_factor(self._settings)
        if start_pose is None:
            start_pose = self.target_pose(start_view)
        self._pose = clip_pose(start_pose)
        self.fps = float(fps)
        self.realtime = bool(realtime)
        self.name = f"sim:seed={self.patient.seed}"
        self._index = 0
        self._t0: float | None = None
        self._next_due: float | None = None

    # ------------------------------------------------------------------------------ settings
    @property
    def settings(self) -> ScanSettings:
        return self._settings

    def configure(self, **changes: Any) -> ScanSettings:
        """Change scanner settings (depth_mm, gain_db, size_px, ...); returns the new settings.

        Raises:
            ValueError: unknown field or out-of-range value.
        """
        try:
            new = self._settings.with_(**changes)
        except TypeError as e:
            raise ValueError(f"unknown scan setting in {sorted(changes)}: {e}") from e
        self._settings = new
        self._renderer = Renderer(self.anatomy, new, self._speckle_offset)
        self._settings_factor = settings_factor(new)
        return new

    @property
    def spacing_mm(self) -> tuple[float, float]:
        s = self._settings.mm_per_px
        return (s, s)

    # ------------------------------------------------------------------------------ pose
    @property
    def pose(self) -> np.ndarray:
        """Current pose [5] (a copy)."""
        return self._pose.copy()

    def set_pose(self, pose: np.ndarray) -> np.ndarray:
        """Put the probe at `pose` [5] (clipped to the skin region and angle limits); returns it."""
        self._pose = clip_pose(pose)
        return self._pose.copy()

    def move(self, action: int | str | np.ndarray, step: float = 1.0) -> np.ndarray:
        """Move by one action (name or index into ACTIONS, `step` normalized units) or by a delta [5].

        Returns:
            The new pose [5].
        """
        if isinstance(action, (str, int, np.integer)) and not isinstance(action, bool):
            if isinstance(action, str) and action.strip().upper() not in ACTIONS:
                raise ValueError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
            delta = action_delta(action.strip().upper() if isinstance(action, str) else int(action), step)
        else:
            delta = np.asarray(action, dtype=np.float64)
            if delta.shape != (5,):
                raise ValueError(f"move needs an action name/index or a pose delta of shape (5,), got {action!r}")
        return self.set_pose(self._pose + delta)

    def target_pose(self, view: str) -> np.ndarray:
        """Target pose [5] of a standard view (PLAX, PSAX, A4C, A2C, SC4C) for this patient."""
        i = view_index(view)
        if i >= len(VIEWS):
            raise ValueError(f"'{view}' has no target pose: choose one of {', '.join(VIEWS)}")
        return self._targets[i].copy()

    def sample_pose(self, rng: np.random.Generator, mode: str = "near", view: str | None = None,
                    spread: float = 1.0) -> np.ndarray:
        """A random pose for datasets and closed-loop starts.

        Args:
            rng: numpy Generator (the only randomness).
            mode: "near": target of `view` (random view if None) plus N(0, spread) normalized units per
                axis; "window": anywhere on the acoustic window of `view` (random window if None):
                +-25 mm around one of its targets, rotation +-90 deg, tilt and rock +-25 deg;
                "random": anywhere on the modelled skin with any orientation (mostly OTHER).
            view: target view name or None.
            spread: standard deviation of "near" in normalized units (devices.labels.POSE_SCALE).

        Raises:
            ValueError: unknown mode or view.
        """
        if mode not in SAMPLE_MODES:
            raise ValueError(f"unknown sample mode '{mode}': choose one of {', '.join(SAMPLE_MODES)}")
        if view is not None:
            self.target_pose(view)  # validates
            view = view.strip().upper()
        if mode == "near":
            v = view or VIEWS[int(rng.integers(len(VIEWS)))]
            return clip_pose(self.target_pose(v) + rng.normal(0.0, spread, 5) * POSE_SCALE)
        if mode == "window":
            window = WINDOW_OF[view] if view else tuple(WINDOWS)[int(rng.integers(len(WINDOWS)))]
            views = WINDOWS[window]
            base = self.target_pose(views[int(rng.integers(len(views)))])
            jitter = rng.uniform([-25.0, -25.0, -90.0, -25.0, -25.0], [25.0, 25.0, 90.0, 25.0, 25.0])
            return clip_pose(base + jitter)
        from devices.sim.pose import ROCK_RANGE_DEG, SLIDE_HEAD_RANGE_MM, SLIDE_LEFT_RANGE_MM, TILT_RANGE_DEG
        lo = [SLIDE_HEAD_RANGE_MM[0], SLIDE_LEFT_RANGE_MM[0], -180.0, TILT_RANGE_DEG[0] / 2, ROCK_RANGE_DEG[0] / 2]
        hi = [SLIDE_HEAD_RANGE_MM[1], SLIDE_LEFT_RANGE_MM[1], 180.0, TILT_RANGE_DEG[1] / 2, ROCK_RANGE_DEG[1] / 2]
        return clip_pose(rng.uniform(lo, hi))

    # ------------------------------------------------------------------------------ truth
    def _best_window_targets(self, anatomical: np.ndarray, renderer: Renderer) -> np.ndarray:
        """Target poses [V, 5]: each view's anatomical pose, or where its rib shadow is too costly the
        pose of the best image within TARGET_SEARCH_RADIUS (what a sonographer does: slide or tilt to
        the best window for this patient). The quality labels still measure the cut against the
        anatomical plane; only where the guidance leads changes. Scored at default scanner settings
        (the target does not move with gain or depth), mean over end-diastole and phase 0.4 (just
        after end-systole, which falls at 0.32-0.38)."""
        beat_s = 60.0 / self.patient.heart_rate_bpm
        times = [((phase - self.patient.phase0) % 1.0) * beat_s for phase in (0.0, 0.4)]
        targets = anatomical.copy()
        moves = [(axis, sign) for axis in range(len(POSE_SCALE)) for sign in (1.0, -1.0)]
        for v in range(len(VIEWS)):
            scores: dict[tuple, float] = {}   # a step back re-proposes the point just left

            def score(u: np.ndarray) -> float:
                key = tuple(u)
                if key not in scores:
                    pose = clip_pose(anatomical[v] + u * POSE_SCALE)
                    plane = math.exp(-0.5 * float(self._plane_distance(pose)[v]) ** 2)
                    scores[key] = plane * float(np.mean([renderer.visible_heart_fraction(pose, t) for t in times]))
                return scores[key]

            best_u, best = np.zeros(len(POSE_SCALE)), score(np.zeros(len(POSE_SCALE)))
            if best >= TARGET_SEARCH_BELOW:
                continue
            for step in TARGET_SEARCH_STEPS:
                improved = True
                while improved:
                    improved = False
                    for axis, sign in moves:
                        u = best_u.copy()
                        u[axis] += sign * step
                        if np.linalg.norm(u) <= TARGET_SEARCH_RADIUS and score(u) > best + 1e-6:
                            best_u, best, improved = u, score(u), True
            targets[v] = clip_pose(anatomical[v] + best_u * POSE_SCALE)
        return targets

    def plane_distance(self, pose: np.ndarray | None = None) -> np.ndarray:
        """How far the image at `pose` is from each target view's image [V], in units of one adjustment.

        Measured on the cut through the heart, not on the skin: the rotation between the probe's and
        the anatomical target's axes (PLANE_ANGLE_DEG), its aimed heart point out of the imaging plane
        (PLANE_OFFSET_MM) and off the sector's centre line (CENTRE_ANGLE_DEG). A slide that a tilt
        compensates leaves the same cut and the same image, and the same quality; the pose offset
        (what the hand must do to reach the target) still counts both.
        """
        return self._plane_distance(self._pose if pose is None else clip_pose(pose))

    def _plane_distance(self, pose: np.ndarray) -> np.ndarray:
        """plane_distance of an already clipped pose (the per-frame label path clips once)."""
        p, r = probe_axes(pose, self.patient.chest_radius_mm)
        cos_turn = (np.einsum("vij,ij->v", self._target_axes, r) - 1.0) / 2.0
        turn = np.degrees(np.arccos(np.clip(cos_turn, -1.0, 1.0)))
        to_aim = self._aims - p[None, :]                                               # [V, 3]
        lateral, out_of_plane, depth = to_aim @ r[:, 0], to_aim @ r[:, 1], to_aim @ r[:, 2]
        off_centre = np.degrees(np.arctan2(np.abs(lateral), depth))
        return np.sqrt((turn / PLANE_ANGLE_DEG) ** 2 + (out_of_plane / PLANE_OFFSET_MM) ** 2
                       + (off_centre / CENTRE_ANGLE_DEG) ** 2)

    def _labels(self, pose: np.ndarray, t: float, visible: float) -> dict[str, Any]:
        offset = wrap_offset(self._targets - pose[None, :])                             # [V, 5]
        dist = pose_distance(offset)
        acoustic = float(visible * self._settings_factor)
        quality = np.exp(-0.5 * self._plane_distance(pose) ** 2) * acoustic
        nearest = int(np.argmin(dist))
        ok = dist[nearest] <= VIEW_RADIUS and acoustic >= _MIN_ACOUSTIC_FOR_VIEW
        return {
            "pose_offset": offset.astype(np.float32),
            "action": best_action(offset, quality).astype(np.int64),
            "quality": quality.astype(np.float32),
            "view": nearest if ok else VIEW_LABELS.index(OTHER),
            "acoustic": acoustic,
            "pose": pose.copy(),
            "patient_seed": self.patient.seed,
            "phase": float(self.anatomy.phase(t)),
        }

    def labels(self, pose: np.ndarray | None = None, t: float = 0.0) -> dict[str, Any]:
        """Ground truth at `pose` (default: the current pose) and time t, without rendering the image."""
        pose = self._pose if pose is None else clip_pose(pose)
        return self._labels(pose, t, self._renderer.visible_heart_fraction(pose, t))

    def render(self, pose: np.ndarray | None = None, t: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
        """B-mode image uint8 [size, size] and its ground truth at `pose` (default current) and time t.

        Deterministic: same patient, settings, pose and t give the same image bit for bit.
        """
        pose = self._pose if pose is None else clip_pose(pose)
        image, visible = self._renderer.render(pose, float(t))
        return image, self._labels(pose, t, visible)

    def pose_matrix(self, pose: np.ndarray | None = None) -> np.ndarray:
        """4x4 probe pose in the patient frame (mm) for Frame.pose (see devices/sim/pose.py)."""
        return pose_matrix(self._pose if pose is None else clip_pose(pose), self.patient.chest_radius_mm)

    # ------------------------------------------------------------------------------ Source
    def open(self) -> "SimulatedProbe":
        self._t0 = time.monotonic()
        self._next_due = self._t0
        return self

    def read(self, timeout: float | None = None) -> Frame | None:
        """Render the current pose at the current time; paced at fps when realtime."""
        if self._t0 is None:
            self.open()
        if self.realtime:
            now = time.monotonic()
            delay = self._next_due - now
            if delay > 0:
                if timeout is not None and delay > timeout:
                    time.sleep(max(0.0, timeout))
                    return None
                time.sleep(delay)
            now = time.monotonic()
            self._next_due = max(self._next_due, now - 1.0 / self.fps) + 1.0 / self.fps
            t_frame = now
            t_sim = now - self._t0
        else:
            t_sim = self._index / self.fps
            t_frame = t_sim
        pose = self._pose.copy()
        image, labels = self.render(pose, t_sim)
        frame = Frame(image=image, t=t_frame, index=self._index, spacing_mm=self.spacing_mm,
                      pose=self.pose_matrix(pose), labels=labels)
        self._index += 1
        return frame


_SPEC_KEYS = {
    "seed": ("patient_seed", int), "patient": ("patient_seed", int), "view": ("start_view", str),
    "fps": ("fps", float), "realtime": ("realtime", "bool"),
    "depth": ("depth_mm", float), "depth_mm": ("depth_mm", float), "sector": ("sector_deg", float),
    "sector_deg": ("sector_deg", float), "size": ("size_px", int), "size_px": ("size_px", int),
    "gain": ("gain_db", float), "gain_db": ("gain_db", float), "dr": ("dynamic_range_db", float),
    "dynamic_range_db": ("dynamic_range_db", float), "freq": ("frequency_mhz", float),
    "frequency_mhz": ("frequency_mhz", float),
}
_SETTING_NAMES = {"depth_mm", "sector_deg", "size_px", "gain_db", "dynamic_range_db", "frequency_mhz"}


def from_spec(rest: str = "", **options: Any) -> SimulatedProbe:
    """Create a probe from a registry spec: `sim`, `sim:seed=3,view=A4C,fps=30,depth=150,size=256`.

    Keyword options (same names as SimulatedProbe's arguments) override the spec.

    Raises:
        SimSpecError: unknown key, bad value (it is both a SourceError and a ValueError).
    """
    kwargs: dict[str, Any] = {}
    setting_changes: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (rest or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise SimSpecError(f"sim spec '{rest}': '{item}' is not key=value with a known key "
                               f"({', '.join(sorted(_SPEC_KEYS))})")
        name, kind = _SPEC_KEYS[key]
        try:
            if kind == "bool":
                if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                val: Any = value.strip().lower() in ("1", "true", "yes")
            else:
                val = kind(value.strip())
        except ValueError:
            raise SimSpecError(f"sim spec '{rest}': bad value for {key}: '{value}'") from None
        (setting_changes if name in _SETTING_NAMES else kwargs)[name] = val
    for k, v in options.items():
        (setting_changes if k in _SETTING_NAMES else kwargs)[k] = v
    try:
        if setting_changes:
            base = kwargs.pop("settings", None) or ScanSettings()
            kwargs["settings"] = base.with_(**setting_changes)
        return SimulatedProbe(**kwargs)
    except (ValueError, TypeError) as e:
        raise SimSpecError(f"sim spec '{rest}': {e}") from None
