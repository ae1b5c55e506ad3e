"""The guidance engine: frames in, one immutable `GuidanceState` out. No Kivy, no torch here.

    source thread --Frame--> latest-frame mailbox (stale frames dropped and counted, never queued)
      --> inference thread: image gates -> preprocess + model (Predictor) -> time smoothing ->
          model gates -> state machine -> auto-capture -> GuidanceState (+ session recorder)

States (GuidanceState.state):
    NO_SIGNAL  no frame yet, no new frame for `stale_timeout_s`, frozen, blank or saturated image;
    SEARCHING  frames arrive but the guidance is not trustworthy (not ultrasound-like / OOD,
               model unsure, inference too slow: `available` False), or no standard view is
               recognised, the target is far and the model is not sure of the way (`available`
               True, no action, where-to-start hint);
    GUIDING    one instruction toward the target (ACTIONS name, hysteresis + minimum dwell); on a
               blind frame (`blind_dark_fraction`) prefixed "No heart in view: ", and for most
               views (`window_first_views`) the move that finds the window first;
    HOLD       smoothed target quality >= the capture level (threshold + capture_margin), or the
               instruction is HOLD: keep still;
    CAPTURED   a clip was just saved (shown `captured_show_s`, then the next protocol view).

Every time-dependent rule runs on `now` (the engine's clock for live sources, `Frame.t` for
replays and simulated time), never on the wall clock, so `process(frame, now)` reproduces a live
session exactly and the closed-loop evaluation runs faster than real time.

Captures: a clip is the last `clip_s` seconds of frames, saved to `capture_folder` as
`<VIEW>_<nnn>.npz` (frames uint8 [N, H, W], t float64 [N], quality float32 [N] (smoothed target
quality per frame), view, target, auto, meta JSON) plus `<VIEW>_<nnn>.png` (the clip's best
frame); the best clip per view so far is also kept as `best_<VIEW>.npz/.png`. With no capture
folder (the default of EngineConfig) captures are counted but not written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

from devices.base import EndOfStream, Frame, Source
from devices.labels import ACTION_TEXT, ACTIONS, HOLD, HOLD_RADIUS_MIN, OTHER, QUALITY_DIAGNOSTIC, VIEW_RADIUS, VIEWS
from edge_app import safety
from edge_app.protocol import WINDOW_HINT, resolve_protocol, resolve_view
from edge_app.smoothing import ActionSelector, TimeEMA

log = logging.getLogger("pocus.engine")

STATES = ("NO_SIGNAL", "SEARCHING", "GUIDING", "HOLD", "CAPTURED")
UNAVAILABLE_PREFIX = "Guidance unavailable: "
# Prefix of an instruction given while the image is already diagnostic but under the capture level, so
# the user knows the image is close and why the app still asks for a move.
NEARLY_THERE = "Nearly there: "
NO_HEART_IN_VIEW = "No heart in view: "   # a blind frame (EngineConfig.blind_dark_fraction): find the window first
NOT_CLEAR_YET = "Hold still: the {view} image is not clear enough to save yet"  # capture check failed
DEFAULT_MIN_CONFIDENCE = 0.4   # max softmax over 6 classes; chance is 0.17
_STATS_LEN = 36_000            # per-frame timings kept for summaries (10 min at 60 fps, 2.6 MB)


# ----------------------------------------------------------------------------------------------
# Model side
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ModelOutput:
    """One frame's model outputs, as probabilities.

    Attributes:
        view_probs: float32 [V+1] softmax over devices.labels.VIEW_LABELS (the V views, then OTHER).
        quality: float32 [V] image quality as each target view, 0..1.
        action_probs: float32 [V, A] softmax over devices.labels.ACTIONS, per target view.
        pose_offset: float32 [V, 5] target - current pose, normalized units (devices.labels.POSE_SCALE).
        ood_score: energy -logsumexp(view_logits) (high = out of distribution); NaN when unknown.
        confidence: max softmax of the view; defaults to max(view_probs).
    """

    view_probs: np.ndarray
    quality: np.ndarray
    action_probs: np.ndarray
    pose_offset: np.ndarray
    ood_score: float = float("nan")
    confidence: float | None = None

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("view_probs", "quality", "action_probs", "pose_offset"):
            a = np.array(getattr(self, name), dtype=np.float32)
            if not np.isfinite(a).all():
                raise ValueError(f"ModelOutput.{name} contains NaN or infinite values")
            a.flags.writeable = False
            arrays[name] = a
        v = arrays["quality"].shape[0] if arrays["quality"].ndim == 1 else -1
        expected = {"view_probs": (v + 1,), "quality": (v,), "action_probs": (v, len(ACTIONS)),
                    "pose_offset": (v, 5)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"ModelOutput.{name} has shape {arrays[name].shape}, expected {shape} "
                                 f"(V={v} views, {len(ACTIONS)} actions)")
        for name, a in arrays.items():
            object.__setattr__(self, name, a)
        object.__setattr__(self, "ood_score", float(self.ood_score))
        conf = float(arrays["view_probs"].max()) if self.confidence is None else float(self.confidence)
        object.__setattr__(self, "confidence", conf)


@runtime_checkable
class Predictor(Protocol):
    """Anything that turns a frame into ModelOutput (the ONNX bundle, a scripted fake, an oracle).

    Optional attributes the engine uses when present: `views` (target names, default
    devices.labels.VIEWS), `manifest` (thresholds), `last_timings` (dict of stage -> ms).
    """

    name: str
    precision: str

    def predict(self, image: np.ndarray) -> ModelOutput:
        """uint8 [H, W] frame -> ModelOutput."""
        ...


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class BundlePredictor:
    """Runs an `edge_app.bundle.Bundle` on one frame: devices.preprocess -> ONNX -> softmax.

    The OOD score is the energy -logsumexp(view_logits) (Liu et al. 2020, "Energy-based
    out-of-distribution detection"), the same definition the exporter calibrates
    thresholds.ood_energy_max with (`edge_app.bundle.view_scores`); the engine gates on it only
    when EngineConfig.max_ood_energy is set.

    Args:
        bundle: a loaded Bundle (anything with `.run(x) -> dict`, `.manifest`, `.precision`).
        warmup: run one blank frame first so the first real frame is not slow.
    """

    def __init__(self, bundle: Any, warmup: bool = True) -> None:
        from devices.preprocess import INPUT_SIZE, NORM_MEAN, NORM_STD

        self.bundle = bundle
        self.manifest: dict = dict(getattr(bundle, "manifest", {}) or {})
        spec = self.manifest.get("input", {})
        shape = spec.get("shape") or [1, 1, INPUT_SIZE, INPUT_SIZE]
        norm = spec.get("normalization") or {}
        self.size = int(shape[-1])
        self.mean = float(norm.get("mean", NORM_MEAN))
        self.std = float(norm.get("std", NORM_STD))
        labels = self.manifest.get("labels", {})
        views = [v for v in (labels.get("targets") or labels.get("views") or VIEWS) if v != OTHER]
        self.views: tuple[str, ...] = tuple(views)
        actions = tuple(labels.get("actions") or ACTIONS)
        if actions != ACTIONS:
            raise ValueError(f"bundle {getattr(bundle, 'path', '')}: its actions {actions} differ from this "
                             f"runtime's {ACTIONS}; update pocus or re-export the model")
        model = self.manifest.get("model", {})
        self.name: str = str(getattr(bundle, "name", None) or model.get("name") or "model")
        self.precision: str = str(getattr(bundle, "precision", None) or self.manifest.get("precision") or "fp32")
        self.last_timings: dict[str, float] = {}
        if warmup:
            self.predict(np.zeros((self.size, self.size), np.uint8))

    def predict(self, image: np.ndarray) -> ModelOutput:
        """uint8 [H, W] frame -> ModelOutput; fills `last_timings` (preprocess_ms, inference_ms)."""
        from devices.preprocess import preprocess

        t0 = time.perf_counter()
        x = preprocess(image, self.size, self.mean, self.std)[None]   # [1, 1, S, S]
        t1 = time.perf_counter()
        out = self.bundle.run(x)
        t2 = time.perf_counter()
        logits = np.asarray(out["view_logits"][0], dtype=np.float64)   # [V+1]
        top = logits.max()
        lse = top + math.log(np.exp(logits - top).sum())
        result = ModelOutput(
            view_probs=np.exp(logits - lse),
            quality=np.clip(out["quality"][0], 0.0, 1.0),              # [V]
            action_probs=_softmax(out["action_logits"][0]),              # [V, A]
            pose_offset=out["pose_offset"][0],                           # [V, 5]
            ood_score=-lse,
        )
        self.last_timings = {"preprocess_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}
        return result


# ----------------------------------------------------------------------------------------------
# Configuration and state
# ----------------------------------------------------------------------------------------------

# Predicted pose offsets (normalized units) under which a fine correction has no direction to give.
FINE_MIN_OFFSET = 0.1
# Auto-capture margin over the diagnostic threshold per target view (EngineConfig.capture_margin),
# chosen for the shipped model by the closed loop (see EngineConfig).
CAPTURE_MARGINS = {"PLAX": 0.22, "PSAX": 0.20, "A4C": 0.24, "A2C": 0.24, "SC4C": 0.24}
# Best-achievable capture (EngineConfig.patience_s): this long steady at threshold + this margin.
PATIENCE_S = 6.0
# PSAX's (0.21) is over its capture margin: in effect no best-achievable capture for PSAX (EngineConfig).
PATIENCE_MARGINS = {"PLAX": 0.15, "PSAX": 0.21, "A4C": 0.15, "A2C": 0.18, "SC4C": 0.15}
BEST_ACHIEVABLE = " (the best this window gives)"
# The capture check's slack per target view (EngineConfig.capture_check_slack); None: no check. PLAX
# and A4C capture without it: there it cost successes and saved no false capture.
CAPTURE_CHECK_SLACK = {"PLAX": None, "PSAX": 0.03, "A4C": None, "A2C": 0.03, "SC4C": 0.03}


@dataclass
class EngineConfig:
    """Engine settings. Thresholds left as None come from the bundle manifest, else a default.

    Attributes:
        smoothing_s: window over which view, quality, action and pose outputs are averaged (an
            EMA with time constant smoothing_s / 2: the lag of a window this long). 0.4 s: long
            enough to average speckle, short enough to follow a hand movement.
        hysteresis: probability lead another action needs to replace the shown one.
        min_dwell_s: an instruction stays at least this long (reaction ~0.4 s plus a move).
        stale_timeout_s: no new frame for this long -> NO_SIGNAL (several frames at 15-60 fps).
        frozen_diff: grey levels (mean absolute difference of 64x64 thumbnails); consecutive frames
            closer than this count as identical. A live heart or a hand-held probe moves the
            image by ~0.5-4; a paused scanner through a capture card gives ~0-0.1.
        frozen_s: image unchanged this long -> "frozen image" (a heartbeat always moves the image;
            a near-black frame, a still probe over lung, is exempt: safety.FROZEN_MAX_DARK_FRACTION).
        quality_threshold: diagnostic quality (manifest thresholds.quality_diagnostic, else
            devices.labels.QUALITY_DIAGNOSTIC).
        min_confidence: smoothed max view softmax below this -> "model unsure" (manifest
            thresholds.confidence_min, else 0.4).
        max_ood_energy: smoothed energy above this -> "input does not look like a cardiac view".
            Off (None) unless set: the manifest's calibrated thresholds.ood_energy_max is recorded,
            not applied. Measured on the shipped model, noise, checkerboards and synthetic
            non-cardiac frames get LOWER energy (median -2.1 to -3.7) than simulator frames (median
            -2.9, 99th percentile -1.2), so the gate rejected only ambiguous cardiac frames and
            withheld the arrow there (closed loop, 2 x 100 episodes on other starts: success 66 / 67
            -> 71 / 74 %, false captures 1 / 4 -> 0 / 2 % without it). The image check stays.
        search_distance: no standard view recognised and the target farther than this
            (normalized pose units) -> SEARCHING with a where-to-start hint, unless the model is
            sure of the way (min_action_confidence).
        min_action_confidence: far from any view, the arrow is still shown when the smoothed
            probability of the best action toward the target is at least this: the model reads the
            way from anatomy it sees outside the standard views (off-window frames with no heart
            give flat action probabilities and stay SEARCHING). Held-out window frames the model
            calls OTHER and far: at >= 0.35 the arrow shows on 95 % of them and its move brings the
            probe closer 92 % of the time (93 % at >= 0.5, shown on only 80 %); a wrong move costs
            one reversible adjustment, a blind search costs far more (closed loop, 100 episodes:
            far-start success 32 % at 0.5, 60 % at 0.35).
        latency_budget_ms: smoothed frame-to-state latency above this -> "inference too slow".
        capture_hold_s: smoothed target quality must stay >= threshold + capture_margin this long
            (1-2 beats).
        capture_margin: auto-capture (and HOLD on quality alone) needs the smoothed quality this far
            above the diagnostic threshold. An earlier model's quality error on held-out frames
            within 1.2 units of a target is 0.09 (sd; 0.04 within 0.3 units, 0.11 beyond 0.6), and
            the closed loop steers the probe to where the model rates the image highest, so its
            errors are selected. The shipped model (pocusnet_m grown from the model before it,
            closed-loop poses and the x5 weight on over-rated quality in training, README) ships
            0.22 for every view. On seeds 11-15 (guided only, 100 episodes per view, successes /
            false captures; its bundle's gates then set on 200 frames, README) it gave 378 / 10
            at 0.22, 386 / 11 with PSAX at 0.20 and 359 / 10 at 0.24 (PSAX 0.22); PSAX at 0.20
            was the better point there, but held out it cost 20 false captures of 400 PSAX
            episodes (0.22: 7), so every view is at 0.22 (per-view picks from 100 episodes did
            not carry over before, docs/eval/findings.md; this choice saw held-out figures). With the
            best-achievable capture (patience_s) the margin is 0.24 for every view: on seeds 11-15
            it gave 387 / 14 against 375 / 14 for 0.22 without it (0.22 with it: 401 / 19), chosen
            there before the held-out run. Seeds 1-10 and 16-25 (2000 episodes): README. The model
            before it shipped 0.22, PSAX 0.20 (1482 / 40 there); earlier models 0.265, 0.25, 0.2.
            One number applies to every view; a mapping gives each view its own (all views named).
            Now per view (CAPTURE_MARGINS, PATIENCE_MARGINS), chosen on seeds 11-15 (200 guided
            episodes per view) in steps of 0.02 with a rule written down first (lower while a step
            gains 5 successes or more per added false capture; raise while it loses 5 or fewer per
            false capture removed): PSAX 0.24 -> 0.22 -> 0.20 -> 0.18 gave 117 / 7, 135 / 8,
            145 / 10, 146 / 17; PLAX 0.22 (169 / 1; 0.24 168 / 1, 0.20 166 / 2); A4C, A2C and SC4C
            stay at 0.24 (A4C 0.22 no gain; A2C 0.22 170 / 9 and 0.26 158 / 4 against 172 / 5;
            SC4C 0.22 184 / 8 against 183 / 6). Patience margins: A2C 0.18 (166 / 3; 0.21 156 / 3);
            PSAX 0.18 137 / 7 and 0.21 132 / 6 against 145 / 10, so PSAX's 0.21 is over its capture
            margin and its best-achievable capture does not fire: PSAX's model quality is compressed
            at the top (mean 0.80 at true quality 0.8-0.9, 0.83 at 0.9-1) and rates near misses at
            true 0.54-0.59 as 0.81-0.85, so a long steady hold at a lower level adds as many false
            captures as successes there. SC4C 0.18 no fewer false captures. Held out, seeds 1-10
            and 16-25: 1645 / 32 against 1622 / 33 with 0.24 and 0.15 everywhere (README).
        reversal_block_s: an axis whose instruction reversed `reversals` times within
            `reversal_window_s` (CW, CCW, CW) is set aside this long and the best instruction on
            another axis is shown (edge_app.smoothing.ActionSelector); 0 turns it off. The model
            cannot read some axes from some images (rotation while rib or lung hides the heart):
            its arrow then flips and the hand wiggles in place. Closed loop, shipped model, 5 x 100
            episodes on other starts (seeds 1-5): success 371 -> 383 of 500 (better on every set),
            false captures 13 -> 15 (block 3 s, 5 s, 8 s and a 10 s window all helped on seeds 1 and
            3; 5 s with a 6 s window helped most; seeds 4 and 5 were run after choosing it). It
            costs the ground-truth predictor 94 -> 89 % (100 episodes): near the target, true
            corrections reverse legitimately. Blocking only beyond a predicted distance of 1 unit
            gives ground truth its 94 % back but the model nothing (seeds 1-3: 199 / 3 false
            captures vs 203 / 3), so the block applies everywhere.
        capture_check_slack: None (off) or how far under the capture level (0.865 -> 0.835) the
            model's worst ratings may be; one value, or one per view (None for a view: that target
            captures without the check): when the hold is complete, the model also rates three
            frames of the hold under seven small image changes (safety.perturbations); the mean of
            their worst ratings must reach capture level - slack, else the hold starts again.
            Costs ~9 ms per frame checked (27 ms once per completed hold) on the 2-core CPU.
            On capture-candidate frames of the closed loop (smoothed quality >= 0.8, 12.7 k
            frames, seeds 1-3) the worst rating separates truly non-diagnostic frames better than
            the quality itself (AUC 0.71 vs 0.62). Closed loop, seeds 1-3 (300 episodes), from
            227 successes / 9 false captures: level 0.75 -> 225 / 7, 0.8 -> 203 / 3; seeds 4-5 (run
            after choosing 0.8): 156 / 6 -> 137 / 1. Seeds 1-5: 383 / 15 -> 340 / 4 (0.8 %). Safety
            first: a non-diagnostic clip saved as diagnostic is a silent wrong answer, a missed
            capture is a visible one, so the check ships (None turns it off). With the stuck-hold
            timer below running through the quality's wobble (more holds reach the check), 0.8
            gave 368 / 7 on seeds 1-5 (1.4 %, over the 1 % target) and 0.82 gives 336 / 3 (0.6 %),
            so the level is 0.82. Per view since the grown model (findings, "the capture check per
            view"): off for PLAX and A4C, where on seeds 53-72 and the held-out seeds (1600
            episodes of those views) it cost 15 successes and saved no false capture (fresh seeds
            73-92, PLAX and A4C: 739 / 4 without it against 735 / 4); PSAX needs it most (without
            it: 295 / 25 against 278 / 10 held out) and a slack of 0 costs far more than it saves
            (dev 1578 / 37 against 1719 / 40).
        hold_stuck_s: HOLD (the model says "at the target", or the quality reaches the capture level)
            this long without a capture -> one fine correction along the largest axis of the
            predicted pose offset, shown while the quality is under the capture level. The timer
            runs through short rises to the capture level: at the edge of the target, tremor makes
            the quality wobble around it and a hold that never lasts capture_hold_s would otherwise
            wait until time runs out. Closed loop, seeds 1-5 with the check at 0.8: 340 -> 368
            successes of 500, false captures 4 -> 7; at 0.82 (shipped) 336 / 3: more captures of
            both kinds, the same trade-off curve. Ground truth gains (seed 1: 87 -> 88 %).
        patience_s, patience_margin: the best-achievable capture. Over a partly shadowed window the
            capture level can stay out of the model's reach while the image is good: traced on seeds
            1-10, 40 guided episodes that ended with no clip although a clip at the capture level
            was in the image held still in HOLD there for seconds, the model's smoothed quality at
            0.82 on average (its maximum 0.79-0.92), in 17 of them with the capture check failing
            two to 29 times. When the smoothed quality stays >= threshold + patience_margin (HOLD or
            GUIDING, armed) for patience_s, the engine runs the capture check at that level and
            saves the clip, marked best_achievable ("... captured (the best this window gives)"); a
            failed check waits the whole time again; None turns it off. patience_margin is one
            number or one per view, like capture_margin (per view since: capture_margin). Closed
            loop, guided only, seeds 11-15, capture margin 0.22 (the engine without it: 375
            successes / 14 false captures of 500): 0.75 for 6 s 401 / 19, for 10 s 402 / 19; 0.72
            for 8 s 404 / 19; 0.78 for 6 s 387 / 17 (PSAX gains most: 48 -> 66 successes). With
            the capture margin raised to 0.24: 387 / 14 (capture_margin).
        blind_dark_fraction: None (off) or a dark share (safety.ImageCheck.dark_fraction) at or
            over which a frame counts as blind: rib or lung shadow, no heart to read a direction
            from. On such frames the action head falls back to what it learned on average (mostly
            "rotate", one way), and along guided far-start paths its arrow moved the probe the right
            way 61 % of the time, rotation's sign only 57 %; the pose head's largest slide, tilt or
            rock offset had the right sign 79 % of the time (seed 41, 2.2 k blind frames), and those
            moves are the ones that bring the heart back into view (find the window, then the plane).
            So a blind frame's action probabilities are replaced by that move
            (`window_first_probs`) before smoothing, unless that offset is under HOLD_RADIUS_MIN
            (then the pose head names no way and the action head's row stays). 0.9 is the "probe over lung" share the frozen
            check already uses; on guided frames it marks truly blind ones (visible heart < 0.05)
            with precision 0.84 and recall 0.83 (seed 47, 15 k frames; docs/eval/findings.md for the
            closed loop).
        window_first_views: the target views whose arrow follows that move on a blind frame. Not
            PSAX: its far starts lie around the PLAX target, a quarter turn away, and there the
            action head's rotation was the better move on blind frames (right 81 % against 69 %,
            seed 41; PSAX on seeds 42-46, 100 episodes: 75 successes with the action head against
            67). The instruction still says "No heart in view: " for every view.
        clip_s: length of a saved clip (2-3 beats).
        captured_show_s: how long CAPTURED stays on screen before the next protocol view.
        rearm_margin: after a capture, quality must fall this far below the threshold before the
            same target auto-captures again.
        capture_folder: where clips are written; None = count captures, write nothing.
        time_base: "clock" (arrival time on the engine clock: live) or "source" (Frame.t: replays
            faster or slower than real time behave like the original session).
        drop_stale: True for live sources (keep only the newest frame); False for replays (the
            source waits, every frame is processed).
    """

    smoothing_s: float = 0.4
    hysteresis: float = 0.15
    min_dwell_s: float = 0.8
    stale_timeout_s: float = 0.5
    frozen_diff: float = 0.25
    frozen_s: float = 1.0
    quality_threshold: float | None = None
    min_confidence: float | None = None
    max_ood_energy: float | None = None
    search_distance: float = VIEW_RADIUS
    min_action_confidence: float = 0.35
    latency_budget_ms: float = 100.0
    capture_hold_s: float = 1.5
    capture_margin: float | Mapping[str, float] = field(default_factory=lambda: dict(CAPTURE_MARGINS))
    hold_stuck_s: float = 2.0
    clip_s: float = 3.0
    captured_show_s: float = 2.0
    rearm_margin: float = 0.1
    capture_folder: str | os.PathLike | None = None
    time_base: str = "clock"
    drop_stale: bool = True
    reversal_block_s: float = 5.0
    reversal_window_s: float = 6.0
    reversals: int = 2
    capture_check_slack: float | None | Mapping[str, float | None] = field(
        default_factory=lambda: dict(CAPTURE_CHECK_SLACK))
    patience_s: float | None = PATIENCE_S
    patience_margin: float | Mapping[str, float] = field(default_factory=lambda: dict(PATIENCE_MARGINS))
    blind_dark_fraction: float | None = safety.FROZEN_MAX_DARK_FRACTION
    window_first_views: tuple[str, ...] = ("PLAX", "A4C", "A2C", "SC4C")

    def capture_level(self, view: str) -> float:
        """Smoothed quality that auto-capture (and HOLD on quality alone) waits for, for this target."""
        return self.quality_threshold + _for_view(self.capture_margin, view)

    def patience_level(self, view: str) -> float:
        """Smoothed quality the best-achievable capture waits at (patience_s), for this target."""
        return self.quality_threshold + _for_view(self.patience_margin, view)

    def check_slack(self, view: str) -> float | None:
        """The capture check's slack for this target; None: captures without the check."""
        return _for_view(self.capture_check_slack, view)

    def resolved(self, manifest: Mapping[str, Any] | None = None) -> "EngineConfig":
        """A validated copy with None thresholds filled from `manifest['thresholds']` or defaults.

        Raises:
            ValueError: a setting out of range, naming it.
        """
        th = dict((manifest or {}).get("thresholds") or {})
        out = replace(self)
        if out.quality_threshold is None:
            out.quality_threshold = float(th.get("quality_diagnostic", QUALITY_DIAGNOSTIC))
        if out.min_confidence is None:
            out.min_confidence = float(th.get("confidence_min", DEFAULT_MIN_CONFIDENCE))
        for name in ("smoothing_s", "min_dwell_s", "stale_timeout_s", "frozen_diff", "frozen_s",
                     "search_distance", "capture_hold_s", "hold_stuck_s", "clip_s",
                     "captured_show_s", "rearm_margin", "reversal_block_s"):
            if not getattr(out, name) >= 0:
                raise ValueError(f"engine setting {name} must be >= 0, got {getattr(out, name)}")
        for name in ("latency_budget_ms", "reversal_window_s", "reversals"):
            if not getattr(out, name) > 0:
                raise ValueError(f"engine setting {name} must be > 0, got {getattr(out, name)}")
        out.capture_margin = _per_view_setting("capture_margin", out.capture_margin)
        out.patience_margin = _per_view_setting("patience_margin", out.patience_margin)
        out.capture_check_slack = _per_view_setting("capture_check_slack", out.capture_check_slack, off_ok=True)
        if out.patience_s is not None and not out.patience_s > 0:
            raise ValueError(f"engine setting patience_s must be > 0 or None, got {out.patience_s}")
        if out.blind_dark_fraction is not None and not 0.0 < out.blind_dark_fraction <= 1.0:
            raise ValueError(f"engine setting blind_dark_fraction must be in (0, 1] or None, got "
                             f"{out.blind_dark_fraction}")
        out.window_first_views = tuple(out.window_first_views)
        if not set(out.window_first_views) <= set(VIEWS):
            raise ValueError(f"engine setting window_first_views must name views of {', '.join(VIEWS)}, got "
                             f"{', '.join(out.window_first_views)}")
        for name in ("quality_threshold", "min_confidence", "min_action_confidence", "hysteresis"):
            if not 0.0 <= getattr(out, name) <= 1.0:
                raise ValueError(f"engine setting {name} must be in [0, 1], got {getattr(out, name)}")
        if out.time_base not in ("clock", "source"):
            raise ValueError(f"engine setting time_base must be 'clock' or 'source', got {out.time_base!r}")
        return out


def with_reason(prefix: str, instruction: str) -> str:
    """An instruction led by why it is given ("Nearly there: slide ..."), read as one sentence."""
    return prefix + instruction[0].lower() + instruction[1:]


# Share of the action probability a blind frame gives the window-first move (EngineConfig.blind_dark_fraction).
WINDOW_FIRST_PROB = 0.9
WINDOW_AXES = (0, 1, 3, 4)     # slide head/feet, slide left/right, tilt, rock: not rotation


def window_first_probs(pose_offset: np.ndarray, action_probs: np.ndarray) -> np.ndarray:
    """Action probabilities [V, A] for a blind frame: per target view, WINDOW_FIRST_PROB on the move
    along the largest predicted slide, tilt or rock offset (pose_offset [V, 5], normalized), the rest
    spread evenly. Rotation is left out: with no heart in the image its sign is a guess, and turning
    the probe in place rarely brings the heart into view. A view whose largest such offset is under
    HOLD_RADIUS_MIN keeps its action_probs row: a pose head with nothing left to correct on those
    axes names no way to the window, and a confident arrow from it would be a guess."""
    pose = np.asarray(pose_offset, dtype=np.float64)
    axes = np.asarray(WINDOW_AXES)
    axis = axes[np.argmax(np.abs(pose[:, axes]), axis=1)]
    rows = np.arange(len(pose))
    action = 2 * axis + (pose[rows, axis] < 0)
    probs = np.full((len(pose), len(ACTIONS)), (1.0 - WINDOW_FIRST_PROB) / (len(ACTIONS) - 1))
    probs[rows, action] = WINDOW_FIRST_PROB
    no_way = np.abs(pose[rows, axis]) < HOLD_RADIUS_MIN
    probs[no_way] = np.asarray(action_probs, dtype=np.float64)[no_way]
    return probs


def _for_view(value: float | None | Mapping[str, float | None], view: str) -> float | None:
    """A per-view setting's value for one view (before `resolved`, it may still be one number)."""
    return value[view] if isinstance(value, Mapping) else value


def _per_view_setting(name: str, value: float | None | Mapping[str, float | None],
                      off_ok: bool = False) -> dict[str, float | None]:
    """A per-view setting as one value per view (one number: the same for every view), validated;
    with off_ok a value may be None (that view turns the feature off)."""
    out = dict(value) if isinstance(value, Mapping) else dict.fromkeys(VIEWS, value)
    if set(out) != set(VIEWS):
        raise ValueError(f"engine setting {name} per view needs exactly the views {', '.join(VIEWS)}, got "
                         f"{', '.join(map(str, out))}")
    if not all((m is None and off_ok) or (m is not None and 0.0 <= m <= 1.0) for m in out.values()):
        raise ValueError(f"engine setting {name} must be in [0, 1]{' or None' if off_ok else ''}, got {value}")
    return out


@dataclass(frozen=True)
class Capture:
    """One saved clip: target view, smoothed quality at capture, file (None if not written), time."""

    view: str
    quality: float
    path: str | None
    t: float
    auto: bool = True
    best_achievable: bool = False      # taken after a long steady hold under the capture level


@dataclass(frozen=True)
class GuidanceState:
    """Everything the screen (or a test) needs about one moment. Immutable; see the module doc.

    `available` False means `action` is None and `instruction` is "Guidance unavailable: <reason>"
    with all reasons in `reasons`. In SEARCHING with `available` True, `action` is None and the
    instruction says where to place the probe for the target.
    """

    state: str = "NO_SIGNAL"
    available: bool = False
    reasons: tuple[str, ...] = (safety.REASON_WAITING,)
    view: str = ""
    view_confidence: float = 0.0
    target: str = ""
    quality: float = 0.0
    quality_threshold: float = QUALITY_DIAGNOSTIC
    capture_level: float = QUALITY_DIAGNOSTIC   # quality the auto-capture waits for (threshold + margin)
    action: str | None = None
    instruction: str = UNAVAILABLE_PREFIX + safety.REASON_WAITING
    magnitude: float = 0.0
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    frame_index: int = -1
    t: float = 0.0
    fps: float = 0.0
    latency_ms: float = 0.0
    dropped_frames: int = 0
    captures: tuple[Capture, ...] = ()
    protocol: tuple[str, ...] = ()
    protocol_step: int = 0
    recording: bool = False
    source_name: str = ""
    model_name: str = ""
    precision: str = ""
    hold_progress: float = 0.0   # 0..1 of capture_hold_s spent at diagnostic quality (capture ring)


# ----------------------------------------------------------------------------------------------
# Mailbox
# ----------------------------------------------------------------------------------------------

class Mailbox:
    """A one-slot mailbox: a new item replaces an unread one (counted in `dropped`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False
        self.dropped = 0

    def put(self, item: Any, wait: bool = False, stop: threading.Event | None = None) -> None:
        """Leave `item`; with `wait`, first wait until the slot is empty (no drops, for replays)."""
        with self._cond:
            while wait and self._full and not self._closed and not (stop and stop.is_set()):
                self._cond.wait(0.05)
            if self._full:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify_all()

    def get(self, timeout: float) -> Any:
        """The newest item, or None if nothing arrives within `timeout` seconds."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Wake every waiter; later gets return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed, self._item, self._full = False, None, False


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------

class GuidanceEngine:
    """Runs a source through a predictor and publishes GuidanceState.

    Threaded use: `start()`, read `latest()` from any thread, `stop()`. Synchronous use (tests,
    closed-loop evaluation, replays): `process(frame, now)` per frame, `tick(now)` between frames.
    The source must already be open (use it as a context manager around the engine).

    Args:
        source: a devices Source.
        predictor: a Predictor (BundlePredictor for the real model).
        config: EngineConfig; None thresholds come from `predictor.manifest` when present.
        recorder: an open SessionRecorder-like object (`append(frame, extra)`, `close()`) to record
            the session from the start; or use `start_recording(folder)` later.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, source: Source | None, predictor: Predictor, config: EngineConfig | None = None,
                 recorder: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.predictor = predictor
        self.config = (config or EngineConfig()).resolved(getattr(predictor, "manifest", None))
        self.views: tuple[str, ...] = tuple(getattr(predictor, "views", None) or VIEWS)
        self.source_name = str(getattr(source, "name", "") or ("" if source is None else type(source).__name__))
        self._clock = clock
        self._lock = threading.RLock()
        self._mailbox = Mailbox()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._subscribers: list[queue.Queue] = []
        self._recorder = recorder
        self.recording_error: str | None = None
        self.capture_error: str | None = None
        self.error: BaseException | None = None      # source or engine failure (threaded mode)
        self.source_ended = False
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._capture_counts: dict[str, int] = {}
        self.best_captures: dict[str, Capture] = {}
        self._target = "A4C" if "A4C" in self.views else self.views[0]
        self._protocol: tuple[str, ...] = ()
        self._step_i = 0
        self._time_offset = 0.0
        self._reset_session()
        self.stats = _Stats()
        self._state = self._initial_state()

    # -- public commands --------------------------------------------------------------------
    def latest(self) -> GuidanceState:
        """The newest published state (never blocks)."""
        return self._state

    @property
    def done(self) -> bool:
        """True once a threaded run has finished (finite source exhausted, error, or stop())."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a threaded run is done; returns `done`."""
        return self._done.wait(timeout)

    def set_target(self, view: str) -> None:
        """Guide toward `view`; inside a running protocol this jumps to that step, else ends it."""
        view = resolve_view(view, self.views)
        with self._lock:
            if view in self._protocol and self._step_i < len(self._protocol):
                self._step_i = self._protocol.index(view)
            else:
                self._protocol, self._step_i = (), 0
            self._switch_target(view)

    def set_protocol(self, protocol: str | Iterable[str] | None) -> None:
        """Run a protocol (a name such as "focused", or view names); None or () ends it."""
        views = resolve_protocol(protocol, self.views) if protocol else ()
        with self._lock:
            self._protocol, self._step_i = views, 0
            if views:
                self._switch_target(views[0])
            else:
                self._republish()

    def capture_now(self) -> Capture | None:
        """Save the current clip as the target view now (manual capture); None before any frame."""
        with self._lock:
            if not self._ring:
                return None
            cap = self._capture(self._last_now, auto=False)
            state = self._common(self._state)
            if state.available:
                state = replace(state, state="CAPTURED", instruction=self._captured_text, hold_progress=1.0)
            self._publish(state, notify=False)
            return cap

    def start_recording(self, folder: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
        """Record every processed frame with the model outputs and instruction (devices.recorder).

        Raises:
            ValueError: the recorder cannot be created (e.g. folder not writable), naming the folder.
        """
        try:
            from devices.recorder import SessionRecorder
        except ImportError as e:
            raise ValueError(f"cannot record to {folder}: the session recorder is not available ({e})") from e
        info = {"model": self.predictor.name, "precision": self.predictor.precision,
                "target": self._target, "protocol": list(self._protocol), **dict(meta or {})}
        try:
            rec = SessionRecorder(folder, source_name=self.source_name, meta=info,
                                  fps=float(getattr(self.source, "fps", 0.0) or 0.0))
        except OSError as e:
            raise ValueError(f"cannot record to {folder}: {e}") from e
        with self._lock:
            self._close_recorder()
            self._recorder, self.recording_error = rec, None
            self._republish()

    def stop_recording(self) -> None:
        """Close the session recording (no-op when not recording)."""
        with self._lock:
            self._close_recorder()
            self._republish()

    def subscribe(self, maxsize: int = 0) -> queue.Queue:
        """A queue that receives every state made from a frame, plus tick states that change
        `state` or `reasons` (for JSON output); full queues drop states."""
        q: queue.Queue = queue.Queue(maxsize)
        self._subscribers.append(q)
        return q

    def flush(self) -> None:
        """Wait until every capture has been written to disk (a failed write sets `capture_error`)."""
        pending, self._pending = self._pending, []
        for f in pending:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - a failed clip write must not stop the session
                self.capture_error = f"saving a clip failed: {e}"
                log.error("%s", self.capture_error)

    # -- threads ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the source and inference threads (no-op if running)."""
        if any(t.is_alive() for t in self._threads):
            return
        if self.source is None:
            raise ValueError("this engine has no source: use process(frame) instead of start()")
        self._stop.clear()
        self._done.clear()
        self._mailbox.reopen()
        self.error, self.source_ended = None, False
        self._source_finished = threading.Event()
        self._threads = [threading.Thread(target=self._source_loop, name="pocus-source", daemon=True),
                         threading.Thread(target=self._inference_loop, name="pocus-inference", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the threads, write pending captures, close the recording."""
        self._stop.set()
        self._mailbox.close()
        for t in self._threads:
            t.join(timeout)
        self._done.set()
        self.flush()
        with self._lock:
            self._close_recorder()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _source_loop(self) -> None:
        try:
            while not self._stop.is_set():
                t_read = self._clock()
                frame = self.source.read(timeout=0.1)
                if frame is None:
                    continue
                arrival = self._clock()
                self.stats.read_ms.append((arrival - t_read) * 1e3)
                self.stats.received += 1
                self._mailbox.put((frame, arrival), wait=not self.config.drop_stale, stop=self._stop)
        except EndOfStream:
            self.source_ended = True
        except BaseException as e:  # noqa: BLE001 - reported through engine.error and the state
            self.error = e
            log.error("source %s failed: %s", self.source_name, e)
        finally:
            self._source_finished.set()
            self._mailbox.close()

    def _inference_loop(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._mailbox.get(timeout=0.05)
                if item is None:
                    if self._source_finished.is_set():
                        break
                    self.tick()
                    continue
                frame, arrival = item
                now = arrival if self.config.time_base == "clock" else frame.t
                self._step(frame, now, arrival)
            if self.error is not None or self.source_ended:
                # Replays end at the recording's last time, so two replays print the same.
                source_time = self.config.time_base == "source" and self._last_now is not None
                self.tick(self._last_now if source_time else None)
        except BaseException as e:  # noqa: BLE001 - reported through engine.error and the state
            self.error = e
            log.exception("guidance engine failed")
            reasons = (safety.REASON_ENGINE_ERROR.format(error=e),)
            self._publish(replace(self._state, **self._unavailable_fields("NO_SIGNAL", reasons, self._state.t)))
        finally:
            self._stop.set()
            self._done.set()

    # -- one step -----------------------------------------------------------------------------
    def process(self, frame: Frame, now: float | None = None) -> GuidanceState:
        """Run one frame through the whole pipeline synchronously and publish the state.

        Args:
            frame: the frame.
            now: time in seconds on the caller's clock (default `frame.t`).

        Returns:
            The new GuidanceState.
        """
        return self._step(frame, frame.t if now is None else float(now), self._clock())

    def tick(self, now: float | None = None) -> GuidanceState:
        """Update the state when no frame arrives (staleness, end of source, CAPTURED timeout)."""
        with self._lock:
            if now is None:
                now = self._clock() + (self._time_offset if self.config.time_base == "source" else 0.0)
            prev = self._state
            if self.error is not None:
                reasons = (safety.REASON_SOURCE_ERROR.format(error=self.error),)
            elif self.source_ended:
                reasons = (safety.REASON_ENDED,)
            elif self._last_now is None:
                reasons = (safety.REASON_WAITING,)
            elif now - self._last_now > self.config.stale_timeout_s:
                reasons = (safety.REASON_STALE.format(seconds=now - self._last_now),)
            else:
                self._advance_protocol(now)
                if prev.target != self._target:
                    self._republish()
                return self._state
            self._reset_session()
            self._fps_times.clear()
            state = replace(prev, **self._unavailable_fields("NO_SIGNAL", reasons, now))
            changed = (state.state, state.reasons) != (prev.state, prev.reasons)
            self._publish(state, notify=changed)
            return state

    def _step(self, frame: Frame, now: float, arrival: float) -> GuidanceState:
        cfg = self.config
        with self._lock:
            t_start = self._clock()
            if self._last_now is not None and (now < self._last_now or now - self._last_now > cfg.stale_timeout_s):
                self._reset_session()          # time went back (new loop) or the signal came back
            self._last_now = now
            self._time_offset = frame.t - t_start
            self._fps_times.append(now)
            while self._fps_times and self._fps_times[0] < now - 1.0:
                self._fps_times.popleft()
            self._advance_protocol(now)

            image = frame.image
            check = safety.check_image(image)
            frozen_for = self._frozen.update(image, now)
            signal = []
            if check.blank or check.saturated:
                signal.append(safety.REASON_BLANK)
            if frozen_for > cfg.frozen_s and check.dark_fraction <= safety.FROZEN_MAX_DARK_FRACTION:
                signal.append(safety.REASON_FROZEN)

            out = None
            predict_ms = 0.0
            blind = cfg.blind_dark_fraction is not None and check.dark_fraction >= cfg.blind_dark_fraction
            if not signal:
                t0 = self._clock()
                out = self.predictor.predict(image)
                predict_ms = (self._clock() - t0) * 1e3
                self._smooth(out, check, now, blind)
            else:
                self._reset_smoothing()

            self._lat_ema.update((self._clock() - arrival) * 1e3, now)
            fields = self._decide(frame, now, out, tuple(signal), blind)
            self._ring.append((image, now, fields.get("quality", 0.0)))
            while self._ring and self._ring[0][1] < now - cfg.clip_s:
                self._ring.popleft()
            fields = self._auto_capture(fields, now)
            latency_ms = (self._clock() - arrival) * 1e3
            state = GuidanceState(**fields, latency_ms=latency_ms)
            self._publish(state)
            self.stats.add(self, latency_ms, wait_ms=(t_start - arrival) * 1e3,
                           predict_ms=predict_ms if out is not None else None,
                           post_ms=(self._clock() - t_start) * 1e3 - predict_ms)
            if self._recorder is not None:
                self._record(frame, state, out)
            return state

    def _smooth(self, out: ModelOutput, check: safety.ImageCheck, now: float, blind: bool) -> None:
        self._view_ema.update(out.view_probs, now)
        self._quality_ema.update(out.quality, now)
        self._action_ema.update(self._window_first(out) if blind else out.action_probs, now)
        self._pose_ema.update(out.pose_offset, now)
        self._conf_ema.update(out.confidence, now)
        if math.isfinite(out.ood_score):
            self._energy_ema.update(out.ood_score, now)
        self._unlike_ema.update(0.0 if check.ultrasound_like else 1.0, now)

    def _window_first(self, out: ModelOutput) -> np.ndarray:
        """A blind frame's action probabilities: the window-first move for the views that use it."""
        rows = [i for i, view in enumerate(self.views) if view in self.config.window_first_views]
        probs = np.array(out.action_probs, dtype=np.float64)
        probs[rows] = window_first_probs(np.asarray(out.pose_offset)[rows], probs[rows])
        return probs

    def _decide(self, frame: Frame, now: float, out: ModelOutput | None, signal: tuple[str, ...],
                blind: bool = False) -> dict[str, Any]:
        """GuidanceState fields for this frame (one constructor call later keeps the step cheap)."""
        cfg = self.config
        fields = dict(self._common_fields(), image=frame.image, frame_index=frame.index, t=now, fps=self._fps(),
                      dropped_frames=self._mailbox.dropped)
        if signal or out is None:
            return {**fields, **self._unavailable_fields("NO_SIGNAL", signal or (safety.REASON_BLANK,), now)}

        t = self.views.index(self._target)
        view_probs = self._view_ema.value                     # [V+1]
        v = int(np.argmax(view_probs))
        view = self.views[v] if v < len(self.views) else OTHER
        quality = float(self._quality_ema.value[t])
        fields.update(view=view, view_confidence=float(view_probs[v]), quality=quality)

        reasons = []
        energy = self._energy_ema.value
        if self._unlike_ema.value > 0.5 or (cfg.max_ood_energy is not None and energy is not None
                                            and energy > cfg.max_ood_energy):
            reasons.append(safety.REASON_OOD)
        if self._lat_ema.value is not None and self._lat_ema.value > cfg.latency_budget_ms:
            reasons.append(safety.REASON_SLOW)
        if self._conf_ema.value < cfg.min_confidence:
            reasons.append(safety.REASON_UNSURE)
        if reasons:
            return {**fields, **self._unavailable_fields("SEARCHING", tuple(reasons), now)}

        pose = self._pose_ema.value[t]                         # [5] normalized
        distance = float(np.linalg.norm(pose))
        action_probs = self._action_ema.value[t]
        if (view == OTHER and distance > cfg.search_distance
                and float(np.max(action_probs)) < cfg.min_action_confidence):
            self._selector.reset()
            hint = f"Looking for {self._target}: {WINDOW_HINT.get(self._target, 'sweep slowly over the window')}"
            fields.update(state="SEARCHING", available=True, reasons=(), action=None, instruction=hint,
                          magnitude=distance)
            return fields

        a = self._selector.update(action_probs, now)
        level = cfg.capture_level(self._target)
        if quality < level and a != HOLD:
            self._forget_stuck_hold()
            name = "GUIDING"
        else:
            if self._holding_since is None:         # runs on through rises to the capture level
                self._holding_since = now
            name, a = ("HOLD", HOLD) if quality >= level else self._hold_or_fine_correction(pose, now)
        action, text = ACTIONS[a], ACTION_TEXT[ACTIONS[a]]
        if name == "GUIDING" and quality >= cfg.quality_threshold:
            text = with_reason(NEARLY_THERE, text)       # diagnostic already: say why it goes on
        elif name == "GUIDING" and blind:
            text = with_reason(NO_HEART_IN_VIEW, text)   # so a black screen with an arrow makes sense
        if now < self._captured_until:
            name, text = "CAPTURED", self._captured_text
        fields.update(state=name, available=True, reasons=(), action=action, instruction=text,
                      magnitude=distance if a == HOLD else abs(float(pose[a // 2])))
        return fields

    def _hold_or_fine_correction(self, pose: np.ndarray, now: float) -> tuple[str, int]:
        """The model says "at the target" but the image is not good enough to capture: hold a while
        (the heart and the hand move the image), then show one fine correction toward the target
        along the largest axis of the predicted pose offset, for one dwell time. The hold timer
        starts at the first HOLD and runs on while the quality touches the capture level."""
        if now < self._fine_until:
            return "GUIDING", self._fine_action
        axis = int(np.argmax(np.abs(pose)))
        if now - self._holding_since < self.config.hold_stuck_s or abs(float(pose[axis])) < FINE_MIN_OFFSET:
            return "HOLD", HOLD
        self._fine_action = 2 * axis + int(pose[axis] < 0)
        self._fine_until = now + max(self.config.min_dwell_s, 1e-3)
        self._holding_since = self._fine_until      # after the correction, hold again before the next one
        return "GUIDING", self._fine_action

    def _auto_capture(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        """Start, continue or fire the capture timers; updates and returns the state fields."""
        fields = self._capture_at_level(fields, now)
        return fields if fields["state"] == "CAPTURED" else self._capture_best_achievable(fields, now)

    def _may_auto_capture(self, fields: dict[str, Any]) -> bool:
        """Armed (the probe left the last captured view since), guidance available, at or near the view."""
        return self._armed and fields["available"] and fields["state"] in ("HOLD", "GUIDING")

    def _capture_at_level(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        """The usual capture: the smoothed quality at the capture level for capture_hold_s."""
        cfg = self.config
        threshold = cfg.quality_threshold
        state, quality = fields["state"], fields.get("quality", 0.0)
        if not self._armed and (state == "NO_SIGNAL" or quality < threshold - cfg.rearm_margin):
            self._armed = True      # the probe left the view (or the patient): the next good view counts again
        level = cfg.capture_level(self._target)
        good = self._may_auto_capture(fields) and quality >= level
        if not good:
            self._good_since, self._unclear = None, False
            return fields
        if self._good_since is None:
            self._good_since = now
        held = now - self._good_since
        if held < cfg.capture_hold_s:
            fields.update(hold_progress=held / cfg.capture_hold_s,
                          instruction=NOT_CLEAR_YET.format(view=self._target) if self._unclear
                          else f"Hold still: recording the {self._target} clip")
            return fields
        if not self._confirms_capture(now, level):
            self._good_since, self._unclear = now, True       # hold again, and say why
            fields.update(hold_progress=0.0, instruction=NOT_CLEAR_YET.format(view=self._target))
            return fields
        return self._auto_captured(fields, now, best_achievable=False)

    def _capture_best_achievable(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        """After patience_s at or over the patience level with no usual capture (the capture level out
        of reach, or its check failing), capture the best clip this window gives, through the same
        check at the patience level (EngineConfig.patience_s)."""
        cfg = self.config
        level = cfg.patience_level(self._target)
        steady = (cfg.patience_s is not None and self._may_auto_capture(fields)
                  and fields.get("quality", 0.0) >= level)
        if not steady:
            self._steady_since = None
            return fields
        if self._steady_since is None:
            self._steady_since = now
        if now - self._steady_since < cfg.patience_s:
            return fields
        if not self._confirms_capture(now, level):
            self._steady_since = now                   # wait the whole time again
            return fields
        return self._auto_captured(fields, now, best_achievable=True)

    def _auto_captured(self, fields: dict[str, Any], now: float, best_achievable: bool) -> dict[str, Any]:
        """Save the auto-captured clip; the state fields now say so."""
        self._capture(now, auto=True, best_achievable=best_achievable)
        fields.update(self._common_fields(), state="CAPTURED", instruction=self._captured_text, hold_progress=1.0)
        return fields

    def _confirms_capture(self, now: float, level: float) -> bool:
        """Worst quality over safety.perturbations, averaged over the first, middle and last frame
        of the hold, reaches `level` - the target's capture_check_slack (see EngineConfig); True
        where the check is off for the target."""
        cfg = self.config
        slack = cfg.check_slack(self._target)
        if slack is None:
            return True
        t = self.views.index(self._target)
        hold = [img for img, ts, _ in self._ring if ts >= now - cfg.capture_hold_s]
        picks = [hold[i] for i in np.linspace(0, len(hold) - 1, 3).round().astype(int)] if hold else []
        score = np.mean([min(float(self.predictor.predict(p).quality[t]) for p in safety.perturbations(img))
                         for img in picks]) if picks else 0.0
        return score >= level - slack

    # -- captures -----------------------------------------------------------------------------
    def _capture(self, now: float, auto: bool, best_achievable: bool = False) -> Capture:
        view = self._target
        quality = float(self._quality_ema.value[self.views.index(view)]) if self._quality_ema.value is not None else 0.0
        n = self._capture_counts.get(view, 0) + 1
        self._capture_counts[view] = n
        path = None
        folder = self.config.capture_folder
        if folder is not None:
            path = str(Path(folder) / f"{view}_{n:03d}.npz")
        cap = Capture(view=view, quality=quality, path=path, t=now, auto=auto, best_achievable=best_achievable)
        best = self.best_captures.get(view)
        is_best = best is None or quality > best.quality
        if is_best:
            self.best_captures[view] = cap
        if path is not None:
            clip = list(self._ring)
            meta = {"view": view, "quality": quality, "t": now, "auto": auto, "best_achievable": best_achievable,
                    "source": self.source_name,
                    "model": self.predictor.name, "precision": self.predictor.precision,
                    "quality_threshold": self.config.quality_threshold}
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocus-capture")
            self._pending.append(self._writer.submit(_write_clip, Path(path), clip, meta, is_best))
        self._captures += (cap,)
        self._armed = False
        self._good_since = None
        self._forget_stuck_hold()
        self._captured_until = now + self.config.captured_show_s
        nxt = ""
        if self._protocol and self._step_i < len(self._protocol) and self._protocol[self._step_i] == view:
            self._advance_at = self._captured_until
            if self._step_i + 1 < len(self._protocol):
                nxt = f". Next: {self._protocol[self._step_i + 1]}"
            else:
                nxt = ". Protocol complete"
        self._captured_text = f"{view} captured{BEST_ACHIEVABLE if best_achievable else ''}{nxt}"
        return cap

    def _advance_protocol(self, now: float) -> None:
        if self._advance_at is not None and now >= self._advance_at:
            self._advance_at = None
            self._step_i += 1
            if self._step_i < len(self._protocol):
                self._switch_target(self._protocol[self._step_i], publish=False)

    # -- helpers ------------------------------------------------------------------------------
    def _switch_target(self, view: str, publish: bool = True) -> None:
        self._target = view
        self._reset_hold_timer()
        self._selector.forget()
        self._armed = True
        self._captured_until = -math.inf
        self._advance_at = None
        if publish:
            self._republish()

    def _reset_smoothing(self) -> None:
        for ema in (self._view_ema, self._quality_ema, self._action_ema, self._pose_ema, self._conf_ema,
                    self._energy_ema, self._unlike_ema):
            ema.reset()
        self._reset_hold_timer()

    def _reset_hold_timer(self) -> None:
        """Forget the shown instruction and the capture / stuck-at-HOLD timers."""
        self._selector.reset()
        self._good_since, self._unclear = None, False    # _unclear: this hold follows a failed capture check
        self._steady_since: float | None = None           # at the patience level since (best-achievable capture)
        self._forget_stuck_hold()

    def _forget_stuck_hold(self) -> None:
        """No fine correction pending and no "HOLD without a capture" timer running."""
        self._holding_since: float | None = None
        self._fine_until, self._fine_action = -math.inf, HOLD

    def _reset_session(self) -> None:
        """Forget the signal: smoothing, frozen detector, clip buffer (captures are kept)."""
        cfg = self.config
        tau = cfg.smoothing_s / 2
        if not hasattr(self, "_view_ema"):
            self._view_ema, self._quality_ema = TimeEMA(tau), TimeEMA(tau)
            self._action_ema, self._pose_ema = TimeEMA(tau), TimeEMA(tau)
            self._conf_ema, self._energy_ema, self._unlike_ema = TimeEMA(tau), TimeEMA(tau), TimeEMA(tau)
            self._lat_ema = TimeEMA(0.5)
            self._selector = ActionSelector(cfg.hysteresis, cfg.min_dwell_s, cfg.reversal_block_s,
                                           cfg.reversal_window_s, cfg.reversals)
            self._frozen = safety.FrozenDetector(cfg.frozen_diff)
            self._ring: deque = deque()
            self._fps_times: deque = deque()
            self._captures: tuple[Capture, ...] = ()
            self._last_now: float | None = None
            self._armed = True
            self._captured_until = -math.inf
            self._captured_text = ""
            self._advance_at: float | None = None
        self._reset_smoothing()
        self._selector.forget()
        self._lat_ema.reset()
        self._frozen.reset()
        self._ring.clear()

    def _fps(self) -> float:
        times = self._fps_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def _common_fields(self) -> dict[str, Any]:
        return dict(target=self._target, quality_threshold=self.config.quality_threshold,
                    capture_level=min(1.0, self.config.capture_level(self._target)),
                    captures=self._captures,
                    protocol=self._protocol, protocol_step=self._step_i, recording=self._recorder is not None,
                    source_name=self.source_name, model_name=self.predictor.name,
                    precision=self.predictor.precision)

    def _common(self, state: GuidanceState) -> GuidanceState:
        return replace(state, **self._common_fields())

    def _initial_state(self) -> GuidanceState:
        return self._common(GuidanceState())

    def _unavailable_fields(self, name: str, reasons: tuple[str, ...], now: float) -> dict[str, Any]:
        """Fields of an unavailable state: no action, the first reason as the instruction."""
        self._selector.reset()
        fields = dict(self._common_fields(), state=name, available=False, reasons=reasons, action=None,
                      instruction=UNAVAILABLE_PREFIX + reasons[0], magnitude=0.0, t=now, hold_progress=0.0,
                      fps=self._fps(), dropped_frames=self._mailbox.dropped)
        if name == "NO_SIGNAL":   # no model output behind this state: show no view and no quality
            fields.update(view="", view_confidence=0.0, quality=0.0)
        return fields

    def _republish(self) -> None:
        """Publish the current state again after a command (target, protocol, recording)."""
        state = self._common(self._state)
        if state.available and state.target != self._state.target:
            # The instruction belonged to the old target: show nothing wrong until the next frame.
            state = replace(state, state="SEARCHING", action=None, instruction=f"Looking for {state.target}",
                            quality=0.0, hold_progress=0.0)
        elif state.state == "CAPTURED" and state.t >= self._captured_until:
            state = replace(state, state="HOLD" if state.action == "HOLD" else "GUIDING",
                            instruction=ACTION_TEXT.get(state.action or "", state.instruction))
        self._publish(state, notify=False)

    def _publish(self, state: GuidanceState, notify: bool = True) -> None:
        self._state = state
        if notify:
            for q in self._subscribers:
                try:
                    q.put_nowait(state)
                except queue.Full:
                    pass

    def _record(self, frame: Frame, state: GuidanceState, out: ModelOutput | None) -> None:
        extra: dict[str, Any] = {
            "state": state.state, "available": state.available, "reasons": list(state.reasons),
            "instruction": state.instruction, "target": state.target, "action": state.action,
            "view": state.view, "view_confidence": round(state.view_confidence, 4),
            "quality": round(state.quality, 4), "latency_ms": round(state.latency_ms, 2),
        }
        if out is not None:
            extra["model"] = {
                "view_probs": [round(float(p), 4) for p in out.view_probs],
                "quality": [round(float(q), 4) for q in out.quality],
                "action": [ACTIONS[int(a)] for a in out.action_probs.argmax(axis=1)],
                "confidence": round(out.confidence, 4),
                "ood_score": round(out.ood_score, 4) if math.isfinite(out.ood_score) else None,
            }
        try:
            self._recorder.append(frame, extra=extra)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the guidance
            self.recording_error = f"recording stopped: {e}"
            log.error("%s", self.recording_error)
            self._close_recorder()

    def _close_recorder(self) -> None:
        rec, self._recorder = self._recorder, None
        if rec is not None:
            try:
                rec.close()
            except Exception as e:  # noqa: BLE001 - closing must not raise during shutdown
                self.recording_error = f"closing the recording failed: {e}"
                log.error("%s", self.recording_error)


def _write_clip(path: Path, clip: list, meta: dict, is_best: bool) -> None:
    """Write one capture (.npz clip + .png of its best frame); also as best_<VIEW> when best."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = clip[-1][0].shape
    clip = [c for c in clip if c[0].shape == shape]   # a resized source mid-clip: keep the last size
    frames = np.stack([c[0] for c in clip])                  # [N, H, W] uint8
    t = np.array([c[1] for c in clip], dtype=np.float64)     # [N]
    quality = np.array([c[2] for c in clip], dtype=np.float32)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, frames=frames, t=t, quality=quality, view=meta["view"],
                        meta=json.dumps(meta))
    os.replace(tmp, path)
    png = path.with_suffix(".png")
    cv2.imwrite(str(png), frames[int(np.argmax(quality))])
    if is_best:
        for src in (path, png):
            shutil.copyfile(src, src.with_name(f"best_{meta['view']}{src.suffix}"))


def timing_summary(values: np.ndarray) -> dict[str, float | None]:
    """p50 / p99 / mean (3 decimals) of the finite values; None each when there are none."""
    a = values[np.isfinite(values)]
    if a.size == 0:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3)}


class _Ring:
    """Fixed-size float64 history (allocated and touched once, so memory stays flat)."""

    def __init__(self, size: int) -> None:
        self._a = np.full(size, np.nan)
        self._n = 0

    def append(self, value: float) -> None:
        self._a[self._n % len(self._a)] = value
        self._n += 1

    def values(self) -> np.ndarray:
        """The kept values, oldest first."""
        size = len(self._a)
        if self._n <= size:
            return self._a[:self._n].copy()
        i = self._n % size
        return np.concatenate([self._a[i:], self._a[:i]])

    def __len__(self) -> int:
        return min(self._n, len(self._a))


class _Stats:
    """Per-frame timings of a run (the last `_STATS_LEN` frames), for summaries and `pocus bench e2e`.

    The per-processed-frame rings are aligned (NaN where a stage did not run, e.g. no inference on
    a blank frame); `read_ms` is per received frame (source thread).
    """

    def __init__(self) -> None:
        self.received = 0
        self.processed = 0
        self.states: dict[str, int] = {}
        self.read_ms = _Ring(_STATS_LEN)
        self.index = _Ring(_STATS_LEN)          # frame index of each processed frame
        self.t = _Ring(_STATS_LEN)              # its `now`
        self.latency_ms = _Ring(_STATS_LEN)     # arrival (read returned) -> state published
        self.wait_ms = _Ring(_STATS_LEN)        # arrival -> step start (mailbox)
        self.predict_ms = _Ring(_STATS_LEN)
        self.preprocess_ms = _Ring(_STATS_LEN)
        self.inference_ms = _Ring(_STATS_LEN)
        self.post_ms = _Ring(_STATS_LEN)        # smoothing, gates, state machine, capture

    def add(self, engine: GuidanceEngine, latency_ms: float, wait_ms: float, predict_ms: float | None,
            post_ms: float) -> None:
        nan = float("nan")
        self.processed += 1
        state = engine._state
        self.index.append(state.frame_index)
        self.t.append(state.t)
        self.latency_ms.append(latency_ms)
        self.wait_ms.append(wait_ms)
        self.post_ms.append(post_ms)
        self.states[state.state] = self.states.get(state.state, 0) + 1
        timings = (getattr(engine.predictor, "last_timings", None) or {}) if predict_ms is not None else {}
        self.predict_ms.append(nan if predict_ms is None else predict_ms)
        self.preprocess_ms.append(timings.get("preprocess_ms", nan))
        self.inference_ms.append(timings.get("inference_ms", nan))

    def summary(self, skip: int = 0) -> dict[str, Any]:
        """Counts and p50/p99/mean of each timing (ms), ignoring the first `skip` kept frames (warm-up)."""
        def pct(ring: _Ring) -> dict[str, float | None]:
            return timing_summary(ring.values()[skip:])

        return {"received": self.received, "processed": self.processed, "states": dict(self.states),
                "latency_ms": pct(self.latency_ms), "read_ms": pct(self.read_ms), "wait_ms": pct(self.wait_ms),
                "predict_ms": pct(self.predict_ms), "preprocess_ms": pct(self.preprocess_ms),
                "inference_ms": pct(self.inference_ms), "post_ms": pct(self.post_ms)}
