"""Closed-loop evaluation: does a simulated novice who follows the app reach a diagnostic view?

Each episode puts a held-out simulated patient under a simulated novice's hand, starting near the
target or somewhere on an acoustic window, and runs the real `GuidanceEngine` (smoothing, safety
gates, auto-capture: the app's code path) on simulated time until the engine captures a clip or
the novice gives up. Three policies move the hand, on the same starts:

- `guided`: the novice follows the instruction the engine shows;
- `oracle`: the same hand follows the simulator's true best action (upper bound of the guidance);
- `unguided`: the same hand searches with no instructions (a random walk kept on the window).

Success is a captured clip whose TRUE quality for the target (simulator ground truth, averaged over
the frames of the capture hold, i.e. what the saved clip shows) is diagnostic
(>= devices.labels.QUALITY_DIAGNOSTIC); a capture below that is a false capture.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from devices.base import Frame
from devices.labels import (ACTIONS, HOLD, HOLD_RADIUS, MOVE_SIZES, POSE_SCALE, QUALITY_DIAGNOSTIC, VIEW_RADIUS, VIEWS,
                           action_delta, move_size, pose_distance, view_index)

POLICIES = ("guided", "oracle", "unguided")
# How an episode ended, from the simulator's truth along its path (`episode_outcome`): where to look
# when guidance misses its target, the probe's path, the image there, or the capture decision.
OUTCOMES = ("success", "false_capture", "never_near", "never_at_target", "below_capture_level", "not_captured")
# Patients never used in training, validation or the training test split (those use seeds < 30000).
EVAL_SEED_BASE = 30000
TRAIN_SEED_BASE = 0        # training.data.SPLIT_SEED_BASE["train"]: `pocus eval poses` runs on training patients
POSES_EVERY_S = 0.2        # how often `pocus eval poses` keeps the pose shown


@dataclass(frozen=True)
class NoviceParams:
    """A person following on-screen instructions. Defaults from novice-scanning teaching figures.

    Steps are in normalized pose units (devices.labels.POSE_SCALE: 1 unit = 10 mm slide or ~10-12 deg).
    """

    reaction_s: float = 0.4          # choice reaction time to a new instruction (300-500 ms)
    move_s: float = 0.5              # one adjustment takes about half a second of hand motion
    step_mean: float = 0.6           # a few mm to ~1 cm of slide, 5-15 deg of angle per adjustment
    step_cv: float = 0.4             # spread of step size: over- and under-shoot
    size_steps: tuple[float, float, float] = (1.0, 1.0, 1.0)  # step x this for the screen's "small /
    #                                  medium / large move" caption (devices.labels.MOVE_SIZES); the
    #                                  default ignores the caption; (0.5, 1.0, 1.6) follows it: ~3 mm or
    #                                  3-4 deg, ~6 mm or 7 deg, ~1 cm or 10-12 deg (`--size-steps`)
    wrong_way_p: float = 0.1         # moves opposite to the instruction (left/right, cw/ccw mix-ups)
    tremor: float = 0.05             # hand tremor around the intended pose, normalized units (sd), also while holding
    search_every_s: float = 2.0      # with no instruction, a small searching move this often
    restart_after_s: float = 10.0    # searching this long with no instruction (the app in SEARCHING:
    #                                  "Looking for <view>: place the probe ..." or "model unsure"; or
    #                                  no app at all), the novice lifts the probe and starts again
    #                                  somewhere on the window; 0 = never
    give_up_s: float = 60.0          # time limit of an episode

    def validate(self) -> "NoviceParams":
        for name in ("reaction_s", "move_s", "step_mean", "step_cv", "tremor", "search_every_s", "restart_after_s",
                     "give_up_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"novice parameter {name} must be >= 0, got {getattr(self, name)}")
        if len(self.size_steps) != len(MOVE_SIZES) or min(self.size_steps) < 0:
            raise ValueError(f"size_steps needs {len(MOVE_SIZES)} factors >= 0 (small, medium, large), got "
                             f"{self.size_steps}")
        if not 0.0 <= self.wrong_way_p <= 1.0:
            raise ValueError(f"wrong_way_p must be in [0, 1], got {self.wrong_way_p}")
        return self


@dataclass(frozen=True)
class Start:
    """One episode's starting situation, shared by all policies."""

    patient_seed: int
    target: str
    kind: str            # "near" or "far"
    pose: tuple[float, ...]
    seed: int            # the novice's own randomness


@dataclass
class EpisodeResult:
    policy: str
    target: str
    kind: str
    patient_seed: int
    success: bool
    captured: bool
    false_capture: bool
    time_s: float                     # time to capture (or to giving up)
    path_length: float                # normalized pose units travelled
    unavailable_fraction: float       # share of frames with guidance unavailable
    capture_quality: float | None     # true quality at capture
    trajectory: list[list] = field(default_factory=list)  # [t, head_mm, left_mm] samples; [t, None, None]: probe lifted
    visited: list[list[float]] = field(default_factory=list)  # pose shown - target pose (mm / deg), keep_poses only
    closest: float = math.inf         # smallest true pose distance to the target (normalized units)
    best_clip_quality: float = 0.0    # best true quality of a capture-hold's frames anywhere on the path
    outcome: str = ""                 # one of OUTCOMES (episode_outcome)
    best_achievable: bool = False     # the capture was the engine's best-achievable one (EngineConfig.patience_s)


def episode_outcome(success: bool, captured: bool, closest: float, best_clip_quality: float,
                    capture_level: float) -> str:
    """Why an episode ended as it did. Without a capture: a clip at the capture level (in truth) was
    on the path and the engine did not take it ("not_captured": quality estimate or capture rules);
    else the probe never came within VIEW_RADIUS of the target ("never_near": coarse guidance), or
    never within HOLD_RADIUS ("never_at_target": fine guidance), or it was at the target and no clip
    reached the capture level in truth ("below_capture_level": the patient's window, the last fine
    adjustment, tremor; such a clip may still be diagnostic, the level has a safety margin)."""
    if captured:
        return "success" if success else "false_capture"
    if best_clip_quality >= capture_level:
        return "not_captured"
    if closest > VIEW_RADIUS:
        return "never_near"
    return "never_at_target" if closest > HOLD_RADIUS else "below_capture_level"


class Novice:
    """Turns an instruction stream into hand motion with human delay, step error and tremor."""

    def __init__(self, params: NoviceParams, rng: np.random.Generator) -> None:
        self.p = params
        self.rng = rng
        self._seen_action: int | None = None
        self._seen_since = 0.0
        self._motion: np.ndarray | None = None   # remaining pose change of the current adjustment
        self._motion_left_s = 0.0
        self._next_search = params.search_every_s
        self._tremor = np.zeros(5)

    def tremor(self, dt: float) -> np.ndarray:
        """Pose jitter [5] around the intended pose: a slow AR(1) wobble (time constant 0.3 s)."""
        keep = math.exp(-dt / 0.3)
        noise = self.rng.normal(0.0, self.p.tremor * math.sqrt(1.0 - keep ** 2), size=5)
        self._tremor = keep * self._tremor + noise
        return self._tremor * POSE_SCALE

    def _start_move(self, action: int, step_scale: float = 1.0) -> None:
        step = self.p.step_mean * step_scale * float(self.rng.lognormal(0.0, self.p.step_cv))
        if self.rng.random() < self.p.wrong_way_p:
            action = action + 1 if action % 2 == 0 else action - 1
        self._motion = action_delta(action, step)
        self._motion_left_s = max(self.p.move_s, 1e-6)

    def restart(self, now: float) -> None:
        """The probe was lifted and put down again: forget the move in progress."""
        self._motion = None
        self._seen_action, self._seen_since = None, now
        self._next_search = now + self.p.search_every_s

    def step(self, now: float, dt: float, action: int | None, size: int = 1) -> np.ndarray:
        """Intended pose change [5] for this tick, given the instruction on screen (None: none) and
        the size of move it asks for (index into MOVE_SIZES)."""
        delta = np.zeros(5)
        if self._motion is not None:
            share = min(1.0, dt / self._motion_left_s)
            delta += self._motion * share
            self._motion = self._motion * (1.0 - share)
            self._motion_left_s -= dt
            if self._motion_left_s <= 1e-9:
                self._motion = None
                self._seen_since = now      # look at the screen again before the next move
            return delta
        if action != self._seen_action:
            self._seen_action, self._seen_since = action, now
        if action is None:
            if now >= self._next_search:
                self._start_move(int(self.rng.integers(0, HOLD)), step_scale=0.5)
                self._next_search = now + self.p.search_every_s
            return delta
        self._next_search = now + self.p.search_every_s
        if action != HOLD and now - self._seen_since >= self.p.reaction_s:
            self._start_move(action, self.p.size_steps[size])
        return delta


class TruthPredictor:
    """A "perfect model": answers with the simulator's ground truth of the frame it is given.

    Runs the engine with no model error, to tell model failures from engine/state-machine ones; the
    tests use it to check the loop and to drive the app's UI. The engine hands `predict` only the
    image, so frames reach the predictor first: `remember(frame)` (the closed loop) or a source
    whose `read` is tapped (`tap(source)`, the app); labels are looked up by image identity.
    """

    name = "ground-truth"
    precision = "truth"

    def __init__(self) -> None:
        self._labels: dict[int, dict] = {}
        self._last: dict | None = None

    def remember(self, frame: Frame) -> None:
        """Keep the labels of a frame the engine is about to see (the last 16 frames)."""
        if frame.labels is None:
            raise ValueError("the ground-truth predictor needs frames with labels (a simulated probe)")
        self._labels.pop(id(frame.image), None)      # a recycled id goes to the end: evict oldest first
        self._labels[id(frame.image)] = self._last = frame.labels
        if len(self._labels) > 16:
            self._labels.pop(next(iter(self._labels)))

    def tap(self, source: Any) -> "TruthPredictor":
        """Remember every frame `source.read` returns (for an engine that reads the source itself)."""
        read = source.read

        def tapped(timeout: float | None = None) -> Frame | None:
            frame = read(timeout)
            if frame is not None and frame.labels is not None:
                self.remember(frame)
            return frame

        source.read = tapped
        return self

    def predict(self, image: np.ndarray) -> Any:
        from edge_app.engine import ModelOutput

        labels = self._labels.get(id(image), self._last)
        if labels is None:
            raise RuntimeError("the ground-truth predictor has seen no labelled frame yet")
        view_probs = np.full(len(VIEWS) + 1, 0.01)
        view_probs[int(labels["view"])] = 1.0
        action_probs = np.full((len(VIEWS), len(ACTIONS)), 0.01)
        action_probs[np.arange(len(VIEWS)), labels["action"]] = 1.0
        return ModelOutput(view_probs=view_probs / view_probs.sum(), quality=labels["quality"],
                           action_probs=action_probs / action_probs.sum(1, keepdims=True),
                           pose_offset=np.asarray(labels["pose_offset"]) / POSE_SCALE)


def target_views(names: Iterable[str]) -> list[str]:
    """Command-line view names, upper-cased and checked against VIEWS (the evaluations' targets)."""
    views = [v.strip().upper() for v in names]
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"unknown view '{v}': choose from {', '.join(VIEWS)}")
    return views


def make_starts(views: list[str], episodes_per_view: int, seed: int, near_share: float = 0.5,
                first_patient: int = EVAL_SEED_BASE) -> list[Start]:
    """Deterministic starts, on held-out patients by default (patients first_patient + 1000 x seed
    onwards; `pocus eval poses` passes the training split's base).

    A start depends on its view's place in VIEWS, not in `views`: a run on some views draws the
    same starts as the all-view run of the same seed, so the two pair episode by episode.
    "near": the target pose plus N(0, 1) normalized units per axis (about 1 cm and 10 deg off);
    "far": anywhere on the target's acoustic window (+-25 mm, rotation +-90 deg, tilt/rock +-25 deg
    around one of the window's view targets): where a novice who knows the window puts the probe.
    """
    from devices.sim import SimulatedProbe

    if len(VIEWS) * episodes_per_view > 1000:
        raise ValueError(f"at most {1000 // len(VIEWS)} episodes per view and seed (patients are numbered "
                         f"per view within 1000 per seed), got {episodes_per_view}")
    rng = np.random.default_rng(seed)
    noise_seeds = [int(rng.integers(2**31)) for _ in range(len(VIEWS) * episodes_per_view)]
    starts = []
    for view in views:
        v = VIEWS.index(view)
        for e in range(episodes_per_view):
            n = v * episodes_per_view + e
            probe = SimulatedProbe(patient_seed=first_patient + seed * 1000 + n, realtime=False)
            kind = "near" if e < round(episodes_per_view * near_share) else "far"
            pose = probe.sample_pose(np.random.default_rng([seed, v, e]), "near" if kind == "near" else "window",
                                     view=view)
            starts.append(Start(probe.patient.seed, view, kind, tuple(float(x) for x in pose), noise_seeds[n]))
    return starts


def run_episode(start: Start, policy: str, predictor: Any, novice: NoviceParams, fps: float = 15.0,
                engine_config: Any = None, keep_trajectory: bool = False, keep_poses: bool = False) -> EpisodeResult:
    """One episode on simulated time; the engine is the app's own `GuidanceEngine`.

    keep_poses: record the pose shown (tremor included) relative to the target every POSES_EVERY_S
    (`EpisodeResult.visited`), the poses a model trained on the loop's own states should see.
    """
    from devices.sim import SimulatedProbe
    from edge_app.engine import EngineConfig, GuidanceEngine

    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    probe = SimulatedProbe(patient_seed=start.patient_seed, realtime=False)
    config = engine_config or EngineConfig()
    truth = predictor if isinstance(predictor, TruthPredictor) else None
    engine = GuidanceEngine(probe, predictor, config=config)
    engine.set_target(start.target)
    target = view_index(start.target)
    hand = Novice(novice, np.random.default_rng(start.seed))
    probe.set_pose(np.asarray(start.pose))
    dt = 1.0 / fps
    n_unavailable = 0
    path = 0.0
    trajectory: list[list[float]] = []
    visited: list[list[float]] = []
    target_pose = np.asarray(probe.target_pose(start.target), dtype=np.float64)
    poses_every = max(1, int(round(POSES_EVERY_S * fps)))
    n_ticks = int(math.ceil(novice.give_up_s * fps))
    hold_ticks = max(1, int(round(engine.config.capture_hold_s * fps)))
    recent_quality: deque = deque(maxlen=hold_ticks)      # true quality of the frames of the capture hold
    closest, best_clip = math.inf, 0.0
    lost_since: float | None = None                       # searching with no instruction since then
    for tick in range(n_ticks + 1):
        now = tick * dt
        pose = np.asarray(probe.pose, dtype=np.float64)       # where the hand means to be
        shown = pose + hand.tremor(dt)
        image, labels = probe.render(shown, now)
        if keep_poses and tick % poses_every == 0:
            visited.append([round(float(x), 3) for x in shown - target_pose])
        frame = Frame(image=image, t=now, index=tick, labels=labels)
        if truth is not None:
            truth.remember(frame)
        state = engine.process(frame, now=now)
        if keep_trajectory and tick % max(1, int(fps // 2)) == 0:
            trajectory.append([round(now, 2), round(float(pose[0]), 1), round(float(pose[1]), 1)])
        if not state.available:
            n_unavailable += 1
        recent_quality.append(float(labels["quality"][target]))
        closest = min(closest, float(pose_distance(labels["pose_offset"][target])))
        if len(recent_quality) == hold_ticks:
            best_clip = max(best_clip, float(np.mean(recent_quality)))
        if state.captures:
            break
        size = 1
        if policy == "guided":
            action = ACTIONS.index(state.action) if (state.available and state.action) else None
            size = move_size(state.magnitude)
        elif policy == "oracle":
            action = int(labels["action"][target])
            if action != HOLD:
                axis = action // 2
                size = move_size(abs(float(labels["pose_offset"][target][axis])) / POSE_SCALE[axis])
        else:
            action = None
        lost = policy == "unguided" or (policy == "guided" and state.state == "SEARCHING" and action is None)
        lost_since = (now if lost_since is None else lost_since) if lost else None
        if lost and novice.restart_after_s > 0 and now - lost_since >= novice.restart_after_s:
            hand.restart(now)                                 # back to the window, a fresh start on it
            if keep_trajectory:
                trajectory.append([round(now, 2), None, None])
            delta = probe.sample_pose(hand.rng, "window", view=start.target) - pose
            lost_since = now
        else:
            delta = hand.step(now, dt, action, size)
        probe.set_pose(pose + delta)
        path += float(np.linalg.norm((np.asarray(probe.pose) - pose) / POSE_SCALE))
    captured = bool(state.captures)
    quality = float(np.mean(recent_quality)) if captured else None   # what the saved clip shows
    ok = captured and quality >= QUALITY_DIAGNOSTIC
    return EpisodeResult(policy, start.target, start.kind, start.patient_seed, ok, captured, captured and not ok,
                         now if captured else novice.give_up_s, path, n_unavailable / (tick + 1), quality,
                         trajectory, visited, closest, best_clip,
                         episode_outcome(ok, captured, closest, best_clip, engine.config.capture_level(start.target)),
                         captured and state.captures[-1].best_achievable)


def summarize(results: list[EpisodeResult], give_up_s: float) -> dict[str, Any]:
    """Success rate, time to success (median, p90), path length, false captures, unavailability."""
    def block(rs: list[EpisodeResult]) -> dict[str, Any]:
        if not rs:
            return {}
        wins = [r.time_s for r in rs if r.success]
        missed = [r.best_clip_quality for r in rs if not r.captured]
        return {
            "episodes": len(rs),
            "success_rate": sum(r.success for r in rs) / len(rs),
            "time_to_success_median_s": float(np.median(wins)) if wins else None,
            "time_to_success_p90_s": float(np.percentile(wins, 90)) if wins else None,
            "path_length_median": float(np.median([r.path_length for r in rs])),
            "false_capture_rate": sum(r.false_capture for r in rs) / len(rs),
            "best_achievable_captures": sum(r.best_achievable for r in rs),
            "best_achievable_false": sum(r.best_achievable and r.false_capture for r in rs),
            "unavailable_fraction": float(np.mean([r.unavailable_fraction for r in rs])),
            "outcomes": {k: sum(r.outcome == k for r in rs) for k in OUTCOMES},
            "best_clip_quality_median_uncaptured": float(np.median(missed)) if missed else None,
        }

    out: dict[str, Any] = {"give_up_s": give_up_s, "policies": {}}
    for policy in sorted({r.policy for r in results}, key=POLICIES.index):
        rs = [r for r in results if r.policy == policy]
        out["policies"][policy] = {
            "overall": block(rs),
            "by_view": {v: block([r for r in rs if r.target == v]) for v in VIEWS if any(r.target == v for r in rs)},
            "by_start": {k: block([r for r in rs if r.kind == k]) for k in ("near", "far") if any(r.kind == k for r in rs)},
        }
    return out


# --------------------------------------------------------------------------------- running many
_WORKER: dict[str, Any] = {}


def _make_predictor(bundle_dir: str | None, precision: str | None) -> Any:
    """The bundle's model, or with bundle_dir "truth" the ground-truth predictor (engine-only check)."""
    if bundle_dir == "truth":
        return TruthPredictor()
    from edge_app.bundle import load_bundle
    from edge_app.engine import BundlePredictor

    return BundlePredictor(load_bundle(bundle_dir, profile="cpu", precision=precision))


def _worker_init(bundle_dir: str | None, precision: str | None) -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["predictor"] = _make_predictor(bundle_dir, precision)


class Job(NamedTuple):
    """One episode to run in a worker process (`run_episode`'s arguments, less the predictor)."""

    start: Start
    policy: str
    novice: NoviceParams
    fps: float
    keep_trajectory: bool
    engine_config: Any
    keep_poses: bool


def _worker_run(job: Job) -> EpisodeResult:
    start, policy, novice, fps, keep, engine_config, keep_poses = job
    return run_episode(start, policy, _WORKER["predictor"], novice, fps=fps, engine_config=engine_config,
                       keep_trajectory=keep, keep_poses=keep_poses)


def run_jobs(jobs: list[Job], bundle_dir: str | None,
             precision: str | None, workers: int, progress: bool = True) -> list[EpisodeResult]:
    """Run episodes in `workers` processes (1 = in this process), with a progress bar."""
    from tqdm import tqdm

    if workers <= 1:
        _worker_init(bundle_dir, precision)
        return [_worker_run(j) for j in tqdm(jobs, desc="episodes", disable=not progress)]
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(bundle_dir, precision)) as pool:
        return list(tqdm(pool.imap(_worker_run, jobs), total=len(jobs), desc="episodes", disable=not progress))


@dataclass
class EvalConfig:
    """Defaults of `pocus eval guidance`; each is a command-line option."""

    bundle: str | None = None          # bundle folder (default: the shipped one)
    precision: str | None = "int8"     # the precision the app ships with
    episodes: int = 10                 # per target view and policy (half near, half far starts)
    views: tuple[str, ...] = VIEWS
    seed: int = 0                      # draws the held-out patients and starts
    fps: float = 15.0                  # simulated frame rate (the engine's timing is in simulated seconds)
    wrong_way_sweep: tuple[float, ...] = (0.0, 0.2, 0.3)  # extra guided runs at these error rates
    sweep_episodes: int = 4            # per view, for each sweep value
    workers: int = 2
    engine: dict[str, Any] = field(default_factory=dict)   # EngineConfig overrides (margins); {}: its defaults

    def engine_config(self) -> Any:
        from edge_app.engine import EngineConfig

        return EngineConfig(**self.engine)


def evaluate(cfg: EvalConfig, novice: NoviceParams, progress: bool = True) -> tuple[dict[str, Any], list[EpisodeResult]]:
    """All policies on the same starts, plus the novice error-rate sweep. Returns (summary, episodes)."""
    novice.validate()
    views = target_views(cfg.views)
    starts = make_starts(views, cfg.episodes, cfg.seed)
    engine = cfg.engine_config()
    jobs = [Job(s, policy, novice, cfg.fps, i < 2 * len(views), engine, False)
            for policy in POLICIES for i, s in enumerate(starts)]
    sweep_starts = make_starts(views, cfg.sweep_episodes, cfg.seed + 1) if cfg.wrong_way_sweep else []
    sweep_jobs = [Job(s, "guided", replace(novice, wrong_way_p=p), cfg.fps, False, engine, False)
                  for p in cfg.wrong_way_sweep for s in sweep_starts]
    t0 = time.perf_counter()
    results = run_jobs(jobs + sweep_jobs, cfg.bundle, cfg.precision, cfg.workers, progress)
    main, sweep = results[:len(jobs)], results[len(jobs):]
    summary = summarize(main, novice.give_up_s)
    summary["sweep_wrong_way"] = []
    for i, p in enumerate(cfg.wrong_way_sweep):
        rs = sweep[i * len(sweep_starts):(i + 1) * len(sweep_starts)]
        summary["sweep_wrong_way"].append({"wrong_way_p": p, **summarize(rs, novice.give_up_s)["policies"]["guided"]["overall"]})
    summary["config"] = {**asdict(cfg), "novice": asdict(novice), "engine": asdict(engine)}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["environment"] = environment()
    return summary, main


def environment() -> dict[str, str]:
    """Versions of what computes the figures. Two installs of the same code (before `make install`
    pinned the versions in constraints.txt) gave the same model 72 and 76 % on the same 50
    episodes: compare figures only between runs of one environment."""
    import platform

    import cv2
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "opencv": cv2.__version__}


def collect_poses(out: str | Path, episodes_per_view: int = 60, seed: int = 0, bundle: str | None = None,
                  precision: str | None = "int8", workers: int = 2, progress: bool = True,
                  novice: NoviceParams | None = None) -> dict[str, Any]:
    """Where guided novices take the probe: run guided episodes on *training* patients and save the
    poses shown (relative to the target, tremor included) for training on the loop's own states
    (DAgger; `pocus train loop_poses=FILE`). The model is trained on poses drawn around the targets,
    but the closed loop spends its time elsewhere (behind ribs, half-way through a rotation).

    Saves an .npz: view int64 [N] (index into VIEWS), offset float32 [N, 5] (mm / deg, POSE_AXES),
    patient_seed int64 [N]. Returns a summary (episodes, poses, success rate).
    """
    from edge_app.engine import EngineConfig

    if episodes_per_view < 1:
        raise ValueError(f"episodes per view must be at least 1, got {episodes_per_view}")
    starts = make_starts(list(VIEWS), episodes_per_view, seed, first_patient=TRAIN_SEED_BASE)
    jobs = [Job(s, "guided", novice or NoviceParams(), 15.0, False, EngineConfig(), True) for s in starts]
    results = run_jobs(jobs, bundle, precision, workers, progress)
    view = np.array([VIEWS.index(r.target) for r in results for _ in r.visited], dtype=np.int64)
    offset = np.array([o for r in results for o in r.visited], dtype=np.float32).reshape(-1, len(POSE_SCALE))
    patient = np.array([r.patient_seed for r in results for _ in r.visited], dtype=np.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, view=view, offset=offset, patient_seed=patient)
    return {"episodes": len(results), "poses": len(view), "success_rate": float(np.mean([r.success for r in results])),
            "patients": f"{min(s.patient_seed for s in starts)}-{max(s.patient_seed for s in starts)}", "out": str(out)}


def configure_poses(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--out", required=True, help="the .npz to write (view, offset mm/deg, patient_seed)")
    parser.add_argument("--episodes", type=int, default=60, help="guided episodes per target view (half near, half far)")
    parser.add_argument("--seed", type=int, default=0, help="draws another 1000 training patients (0-9)")
    parser.add_argument("--bundle", default=None, help="bundle folder whose guidance the novice follows (default: shipped)")
    parser.add_argument("--precision", default="int8", choices=["int8", "fp32", "fp16"], help="model file to run")
    parser.add_argument("--workers", type=int, default=2, help="processes")

    def run(args: argparse.Namespace) -> int:
        if not 0 <= args.seed <= 9:
            raise ValueError("--seed must be 0-9 (training patients are seeds 0-9999)")
        info = collect_poses(args.out, args.episodes, args.seed, args.bundle, args.precision, args.workers)
        print(f"{info['poses']} poses from {info['episodes']} guided episodes on training patients "
              f"{info['patients']} (success {info['success_rate']:.0%}) -> {info['out']}")
        return 0

    return run


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate over n episodes (honest error bars for small n)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _seconds(x: float | None) -> str:
    """A time for the report tables: one decimal, '-' when no episode succeeded."""
    return "-" if x is None else f"{x:.1f}"


def headline_table(summary: dict[str, Any]) -> str:
    """Markdown table: policy x (success with its 95 % interval, median/p90 time, false captures, unavailable)."""
    rows = ["| policy | success (95 % interval) | median time (s) | p90 time (s) | false captures | guidance unavailable |",
            "|---|---|---|---|---|---|"]
    for policy, block in summary["policies"].items():
        o = block["overall"]
        lo, hi = wilson_interval(o["success_rate"], o["episodes"])
        rows.append(f"| {policy} | {o['success_rate']:.0%} ({lo:.0%}-{hi:.0%}) | {_seconds(o['time_to_success_median_s'])} | "
                    f"{_seconds(o['time_to_success_p90_s'])} | {o['false_capture_rate']:.1%} | {o['unavailable_fraction']:.0%} |")
    return "\n".join(rows)


def write_report(out_dir: Path, summary: dict[str, Any], results: list[EpisodeResult]) -> Path:
    """Markdown report with plots, and the JSON behind it. Returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "episodes.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")
    give_up = summary["give_up_s"]
    colors = {"guided": "tab:blue", "oracle": "tab:green", "unguided": "tab:gray"}

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0, give_up, 121)
    for policy in summary["policies"]:
        times = np.array([r.time_s for r in results if r.policy == policy and r.success])
        n = sum(r.policy == policy for r in results)
        ax.plot(grid, [(times <= g).sum() / max(n, 1) for g in grid], label=policy, color=colors[policy])
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("share of episodes with a diagnostic capture")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "success_vs_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    views = [v for v in VIEWS if any(r.target == v for r in results)]
    width = 0.8 / max(len(summary["policies"]), 1)
    for k, policy in enumerate(summary["policies"]):
        rates = [summary["policies"][policy]["by_view"][v]["success_rate"] for v in views]
        ax.bar(np.arange(len(views)) + k * width, rates, width, label=policy, color=colors[policy])
    ax.set_xticks(np.arange(len(views)) + width * (len(summary["policies"]) - 1) / 2, views)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "success_by_view.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    for r in results:
        if r.trajectory:
            tr = np.array(r.trajectory, dtype=float)           # a lifted probe (None -> NaN) breaks the line
            ax.plot(tr[:, 2], tr[:, 1], "-", color=colors[r.policy], alpha=0.7, lw=1)
            ax.plot(tr[0, 2], tr[0, 1], "o", color=colors[r.policy], ms=4)
            last = tr[np.isfinite(tr[:, 1])][-1]
            ax.plot(last[2], last[1], "*" if r.success else "x", color=colors[r.policy], ms=8)
    ax.set_xlabel("toward the patient's left (mm from the xiphoid)")
    ax.set_ylabel("toward the head (mm from the xiphoid)")
    ax.set_title("probe paths on the chest (o start, * success, x gave up)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "trajectories.png", dpi=110)
    plt.close(fig)

    lines = ["# Closed-loop guidance evaluation", "",
             f"Held-out simulated patients, {summary['config']['episodes']} episodes per view and policy "
             f"(half near, half far starts), time limit {give_up:.0f} s of simulated time, "
             f"bundle precision {summary['config']['precision']}. Wall time {summary['wall_s']} s.", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items())
             + " (the figures move with these versions: compare runs of one environment).", "",
             headline_table(summary), ""]
    for policy, block in summary["policies"].items():
        o = block["overall"]
        lines.append(f"- {policy}: {o['best_achievable_captures']} best-achievable captures (a long steady hold under "
                     f"the capture level), {o['best_achievable_false']} of them non-diagnostic (in the false captures)")
    lines += ["", "## Per view (success rate)", "",
             "| view | " + " | ".join(summary["policies"]) + " |", "|---" * (len(summary["policies"]) + 1) + "|"]
    for v in views:
        lines.append(f"| {v} | " + " | ".join(f"{summary['policies'][p]['by_view'][v]['success_rate']:.0%}"
                                              for p in summary["policies"]) + " |")
    lines += ["", "## Per start (guided)", ""]
    for kind, block in summary["policies"].get("guided", {}).get("by_start", {}).items():
        lines.append(f"- {kind}: success {block['success_rate']:.0%}, "
                     f"median time {_seconds(block['time_to_success_median_s'])} s")
    lines += ["", "## Why episodes did not succeed", "",
              "From the simulator's truth along each path (`closed_loop.episode_outcome`): *not captured*: "
              "a capture hold's frames reached the capture level in truth and the engine did not capture "
              f"(quality estimate, capture rules); otherwise *never near*: never within {VIEW_RADIUS:g} units "
              f"of the target (coarse guidance); *never at target*: never within {HOLD_RADIUS:g} (fine "
              "guidance); *below capture level*: at the target, but no clip reached the capture level in "
              "truth (the patient's window, the last fine adjustment, tremor). Last column: the best clip's "
              f"true quality in episodes without a capture (diagnostic from {QUALITY_DIAGNOSTIC:g}).", "",
              "| episodes | " + " | ".join(k.replace("_", " ") for k in OUTCOMES[1:]) + " | best clip, no capture |",
              "|---" * (len(OUTCOMES) + 1) + "|"]
    rows = [(p, summary["policies"][p]["overall"]) for p in summary["policies"]]
    rows += [(f"guided {v}", b) for v, b in summary["policies"].get("guided", {}).get("by_view", {}).items()]
    for name, block in rows:
        best = block["best_clip_quality_median_uncaptured"]
        lines.append(f"| {name} | " + " | ".join(str(block["outcomes"][k]) for k in OUTCOMES[1:])
                     + f" | {'-' if best is None else f'{best:.2f}'} |")
    lines += ["", "## Novice error-rate sweep (guided)", "", "| wrong-way probability | success | median time (s) |", "|---|---|---|"]
    for row in summary["sweep_wrong_way"]:
        lines.append(f"| {row['wrong_way_p']:.2f} | {row['success_rate']:.0%} | {_seconds(row['time_to_success_median_s'])} |")
    lines += ["", "![success vs time](success_vs_time.png)", "![by view](success_by_view.png)",
              "![trajectories](trajectories.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def _number(word: str, off_ok: bool) -> float | None:
    """A number; with off_ok also 'off' (None: the feature off). Raises ValueError."""
    return None if off_ok and word.strip().lower() == "off" else float(word)


def _per_view_option(option: str, text: str, off_ok: bool = False) -> float | None | dict[str, float | None]:
    """One number, or VIEW=NUMBER for every view (the engine checks the views); with off_ok, 'off'
    may stand for a number (that view, or every view, turns the feature off)."""
    try:
        if "=" not in text:
            return _number(text, off_ok)
        return {view.strip().upper(): _number(word, off_ok) for view, _, word in (p.partition("=") for p in text.split(","))}
    except ValueError:
        forms = "a number or 'off'" if off_ok else "one number"
        raise ValueError(f"bad {option} '{text}': {forms}, or VIEW=... for each view") from None


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The engine settings a closed-loop run may override (margins, blind-frame level, capture check,
    arrow confidence, reversal block), the same in every command that runs the engine."""
    parser.add_argument("--capture-margin", default=None, metavar="M|VIEW=M,...",
                        help="engine's auto-capture margin over the diagnostic threshold: one number, or one per view "
                             "(PLAX=0.22,PSAX=0.2,...); default: the engine's")
    parser.add_argument("--patience-margin", default=None, metavar="M|VIEW=M,...",
                        help="margin of the engine's best-achievable capture (EngineConfig.patience_margin), the same "
                             "forms; default: the engine's")
    parser.add_argument("--blind-dark-fraction", default=None, metavar="F|off",
                        help="dark share at which a frame counts as blind (rib or lung shadow): the instruction "
                             "says 'No heart in view' and, for all views but PSAX, the arrow follows the largest "
                             "predicted slide, tilt or rock offset (EngineConfig.blind_dark_fraction, "
                             "window_first_views); 'off' keeps the action head's; default: the engine's")
    parser.add_argument("--capture-check-slack", default=None, metavar="S|off|VIEW=S|off,...",
                        help="how far under the capture level the model's worst rating of hold frames under small "
                             "image changes may be (EngineConfig.capture_check_slack); 'off' captures without that "
                             "check; one value, or one per view (PLAX=off,PSAX=0.03,...); default: the engine's. "
                             "Chosen for an earlier model: check it again for a new one")
    parser.add_argument("--min-action-confidence", type=float, default=None, metavar="P",
                        help="far from any view, the smoothed probability of the best action at which the arrow is "
                             "still shown (EngineConfig.min_action_confidence); default: the engine's")
    parser.add_argument("--reversal-block", type=float, default=None, metavar="S", dest="reversal_block_s",
                        help="seconds an axis whose instruction keeps reversing is set aside; 0 turns it off "
                             "(EngineConfig.reversal_block_s); default: the engine's")


def engine_overrides(args: argparse.Namespace) -> dict[str, float | dict[str, float] | None]:
    """The EngineConfig overrides the engine options ask for, checked here (bad values fail before any
    episode runs, not in every worker)."""
    from edge_app.engine import EngineConfig

    per_view = {"capture_margin": False, "patience_margin": False, "capture_check_slack": True}
    overrides: dict = {name: _per_view_option("--" + name.replace("_", "-"), getattr(args, name), off_ok)
                       for name, off_ok in per_view.items() if getattr(args, name) is not None}
    if args.blind_dark_fraction is not None:
        try:
            overrides["blind_dark_fraction"] = _number(args.blind_dark_fraction, off_ok=True)
        except ValueError:
            raise ValueError(f"bad --blind-dark-fraction '{args.blind_dark_fraction}': a number or 'off'") from None
    overrides.update({name: getattr(args, name) for name in ("min_action_confidence", "reversal_block_s")
                      if getattr(args, name) is not None})
    EngineConfig(**overrides).resolved()
    return overrides


def configure_eval(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    d, n = EvalConfig(), NoviceParams()
    parser.add_argument("--bundle", default=None,
                        help="bundle folder (default: the shipped bundle); 'truth' runs the engine on the "
                             "simulator's ground truth instead of a model, to separate engine from model failures")
    parser.add_argument("--precision", default=d.precision, choices=["int8", "fp32", "fp16"], help="model file to run")
    parser.add_argument("--episodes", type=int, default=d.episodes, help="episodes per target view and policy")
    parser.add_argument("--views", nargs="+", default=list(d.views), help="target views")
    parser.add_argument("--seed", type=int, default=d.seed, help="draws another set of held-out patients and starts")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes")
    parser.add_argument("--wrong-way", type=float, default=n.wrong_way_p, help="novice's probability to move the wrong way")
    parser.add_argument("--sweep", type=float, nargs="*", default=list(d.wrong_way_sweep),
                        help="extra guided runs at these wrong-way probabilities (none: skip)")
    parser.add_argument("--give-up", type=float, default=n.give_up_s, help="time limit per episode (simulated s)")
    parser.add_argument("--size-steps", type=float, nargs=3, default=list(n.size_steps), metavar=("SMALL", "MEDIUM", "LARGE"),
                        help="novice's step factor for the screen's small / medium / large move caption "
                             "(default 1 1 1: ignores it; 0.5 1 1.6: follows it)")
    add_engine_options(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", default=None, help="folder for the Markdown report, plots and JSON")

    def run(args: argparse.Namespace) -> int:
        if args.episodes < 1:
            raise ValueError("--episodes must be at least 1")
        cfg = EvalConfig(bundle=args.bundle, precision=args.precision, episodes=args.episodes,
                         views=tuple(args.views), seed=args.seed, wrong_way_sweep=tuple(args.sweep),
                         workers=args.workers, engine=engine_overrides(args))
        novice = NoviceParams(wrong_way_p=args.wrong_way, give_up_s=args.give_up,
                              size_steps=tuple(args.size_steps))
        summary, results = evaluate(cfg, novice, progress=not args.json)
        if args.out:
            report = write_report(Path(args.out), summary, results)
            if not args.json:
                print(f"report: {report}")
        if args.json:
            print(json.dumps(summary))
        else:
            print(headline_table(summary))
        return 0

    return run
