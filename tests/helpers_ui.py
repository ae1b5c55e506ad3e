"""UI test helpers: a fake movable probe, a fake engine with the engine API, and a launcher.

Run as a script (under xvfb-run) to open the real app:
    python tests/helpers_ui.py --source fake --engine auto --stall-after-s 3 --keys "1.5:right,2:e"
`--engine auto` uses edge_app.engine.GuidanceEngine with an oracle predictor when that module
exists, else `FakeEngine`. `--source auto` is the simulator ("sim").

The README screenshot (docs/app_screenshot.png):
    xvfb-run -a -s "-screen 0 1280x800x24" python tests/helpers_ui.py --readme-shot docs/app_screenshot.png --predictor bundle
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.base import Frame, Source  # noqa: E402
from devices.labels import (  # noqa: E402
    ACTION_TEXT, ACTIONS, OTHER, POSE_SCALE, QUALITY_DIAGNOSTIC, VIEW_LABELS, VIEW_RADIUS, VIEWS,
    action_delta, best_action, pose_distance,
)

# Target poses of the fake patient (mm / deg, order POSE_AXES): far enough apart to be distinct views.
FAKE_TARGETS = {
    "PLAX": np.array([0.0, 0.0, 0.0, 0.0, 0.0]),
    "PSAX": np.array([0.0, 0.0, 90.0, 0.0, 0.0]),
    "A4C": np.array([-60.0, 50.0, -30.0, 0.0, 0.0]),
    "A2C": np.array([-60.0, 50.0, -90.0, 0.0, 0.0]),
    "SC4C": np.array([-140.0, 0.0, 0.0, 40.0, 0.0]),
}


# Where practice starts: this far (normalized units, order POSE_AXES) short of the A4C target.
START_OFFSET = (0.0, 0.0, 1.3, 0.0, 0.0)


class FakeProbe(Source):
    """A movable synthetic probe: a speckled sector with a beating ring that moves with the pose.

    Args:
        size: output image side in pixels.
        fps: frame rate (reads are paced in real time).
        start_view: target view the start pose is near.
        start_offset: normalized offset from that target, order POSE_AXES.
        stall_after_s: stop producing frames after this many seconds (None: never).
    """

    name = "fake-probe"

    def __init__(self, size: int = 256, fps: float = 30.0, start_view: str = "A4C",
                 start_offset=None, stall_after_s: float | None = None):
        start_offset = START_OFFSET if start_offset is None else start_offset
        self.size, self.fps = size, fps
        self._pose = FAKE_TARGETS[start_view] - np.asarray(start_offset, dtype=np.float64) * POSE_SCALE
        self._lock = threading.Lock()
        self.stall_after_s = stall_after_s
        rng = np.random.default_rng(0)
        self._speckle = rng.rayleigh(0.5, size=(3 * size, 3 * size)).astype(np.float32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.hypot(xx - size / 2, yy)
        ang = np.degrees(np.arctan2(xx - size / 2, yy))
        self._sector = (np.abs(ang) < 40) & (r < size * 0.98)
        self._yy, self._xx = yy, xx
        self._t0 = None
        self._index = 0
        self._next = 0.0

    @property
    def pose(self) -> np.ndarray:
        with self._lock:
            return self._pose.copy()

    def set_pose(self, pose) -> None:
        with self._lock:
            self._pose = np.asarray(pose, dtype=np.float64).copy()

    def move(self, action, step: float = 1.0) -> None:
        """Move the probe like devices.sim.SimulatedProbe.move (step in normalized units)."""
        with self._lock:
            self._pose = self._pose + action_delta(action, step)

    def labels(self, pose) -> dict:
        offsets = np.stack([FAKE_TARGETS[v] - pose for v in VIEWS])  # [V, 5]
        dist = pose_distance(offsets)
        nearest = int(np.argmin(dist))
        return {"pose_offset": offsets.astype(np.float32), "action": best_action(offsets),
                "quality": np.exp(-0.5 * dist ** 2).astype(np.float32),
                "view": nearest if dist[nearest] <= VIEW_RADIUS else VIEW_LABELS.index(OTHER),
                "pose": pose.copy()}

    def render(self, pose, t: float) -> np.ndarray:
        s = self.size
        ox = int(pose[1] * 2) % (2 * s)
        oy = int(pose[0] * 2) % (2 * s)
        img = self._speckle[oy:oy + s, ox:ox + s] * 40.0
        # a beating "ventricle" whose position tracks the offset to the nearest target
        lab = self.labels(pose)
        off = lab["pose_offset"][int(np.argmin(pose_distance(lab["pose_offset"])))] / POSE_SCALE
        cx, cy = s / 2 + 25 * off[1], s * 0.55 + 25 * off[0]
        radius = s * (0.16 + 0.02 * np.sin(2 * np.pi * 1.2 * t))
        ring = np.abs(np.hypot(self._xx - cx, self._yy - cy) - radius) < s * 0.03
        img = img + ring * 140.0
        img[~self._sector] = 0
        return np.clip(img, 0, 255).astype(np.uint8)

    def read(self, timeout: float | None = None) -> Frame | None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._next = now
        if self.stall_after_s is not None and now - self._t0 > self.stall_after_s:
            time.sleep(min(timeout or 0.0, 0.05))
            return None
        wait = self._next - now
        if wait > 0:
            if timeout is not None and wait > timeout:
                time.sleep(timeout)
                return None
            time.sleep(wait)
        self._next = max(self._next, time.monotonic() - 1 / self.fps) + 1 / self.fps
        pose = self.pose
        t = time.monotonic() - self._t0
        frame = Frame(self.render(pose, t), t=time.monotonic(), index=self._index, labels=self.labels(pose))
        self._index += 1
        return frame


@dataclass(frozen=True)
class FakeCapture:
    view: str
    quality: float
    path: str
    t: float


@dataclass(frozen=True)
class FakeState:
    """Same field names as edge_app.engine.GuidanceState."""

    state: str = "NO_SIGNAL"
    available: bool = False
    reasons: tuple = ("no frame yet",)
    view: str = OTHER
    view_confidence: float = 0.0
    target: str = "A4C"
    quality: float = 0.0
    quality_threshold: float = QUALITY_DIAGNOSTIC
    action: str | None = None
    instruction: str = "Guidance unavailable: no frame yet"
    magnitude: float = 0.0
    image: Any = None
    frame_index: int = -1
    t: float = 0.0
    fps: float = 0.0
    latency_ms: float = 0.0
    dropped_frames: int = 0
    captures: tuple = ()
    protocol: tuple = ()
    protocol_step: int = 0
    recording: bool = False
    source_name: str = "fake-probe"
    model_name: str = "oracle"
    precision: str = "fp32"
    hold_progress: float = 0.0


@dataclass
class FakeEngine:
    """The engine API on ground-truth labels: a reader thread, latest() never blocks.

    Stale gate: no new frame for `stale_s` -> unavailable. HOLD for `capture_hold_s` -> capture.
    """

    source: Any
    stale_s: float = 1.0
    capture_hold_s: float = 1.5
    target: str = "A4C"
    calls: list = field(default_factory=list)

    def __post_init__(self):
        self._state = FakeState(target=self.target)
        self._stop = threading.Event()
        self._thread = None
        self._captures: tuple = ()
        self._protocol: tuple = ()
        self._step = 0
        self._hold_since = None
        self._captured_until = 0.0
        self._recording = False
        self._last_frame_t = None
        self._last_frame = None
        self._fps = 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        self.calls.append("start")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self.calls.append("stop")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def latest(self):
        return self._state

    def set_target(self, view):
        self.calls.append(("set_target", view))
        self.target, self._protocol, self._hold_since = view, (), None

    def set_protocol(self, views):
        self.calls.append(("set_protocol", views))
        self._protocol, self._step = tuple(views or ()), 0
        if self._protocol:
            self.target = self._protocol[0]

    def capture_now(self):
        self.calls.append("capture_now")
        self._capture(self._state.quality)

    def start_recording(self, folder):
        self._recording = True

    def stop_recording(self):
        self._recording = False

    def _capture(self, quality):
        self._captures += (FakeCapture(self.target, float(quality), "", time.monotonic()),)

    def _run(self):
        while not self._stop.is_set():
            frame = self.source.read(timeout=0.1)
            now = time.monotonic()
            if frame is not None:
                if self._last_frame_t is not None:
                    self._fps = 0.9 * self._fps + 0.1 / max(now - self._last_frame_t, 1e-3)
                self._last_frame_t, self._last_frame = now, frame
            self._state = self._make_state(now)

    def _make_state(self, now):
        frame = self._last_frame
        common = dict(target=self.target, captures=self._captures, protocol=self._protocol,
                      protocol_step=self._step, recording=self._recording, fps=self._fps, latency_ms=3.0)
        if frame is None or now - self._last_frame_t > self.stale_s:
            age = 0.0 if frame is None else now - self._last_frame_t
            why = "no frame yet" if frame is None else f"no new frame for {age:.1f} s"
            return FakeState(reasons=(why,), instruction=f"Guidance unavailable: {why}",
                             image=None if frame is None else frame.image,
                             frame_index=-1 if frame is None else frame.index, **common)
        lab = frame.labels
        v = VIEWS.index(self.target)
        action = ACTIONS[int(lab["action"][v])]
        offset = lab["pose_offset"][v] / POSE_SCALE
        quality = float(lab["quality"][v])
        phase = "GUIDING"
        if now < self._captured_until:
            phase = "CAPTURED"
        elif action == "HOLD" or quality >= QUALITY_DIAGNOSTIC:
            phase, action = "HOLD", "HOLD"
            self._hold_since = self._hold_since or now
            if now - self._hold_since >= self.capture_hold_s:
                self._capture(quality)
                self._hold_since, self._captured_until = None, now + 2.0
                if self._protocol and self._step < len(self._protocol):
                    self._step += 1
                    if self._step < len(self._protocol):
                        self.target = self._protocol[self._step]
        else:
            self._hold_since = None
        view = VIEW_LABELS[int(lab["view"])]
        return FakeState(state=phase, available=True, reasons=(), view=view, view_confidence=0.9,
                         quality=quality, action=None if phase == "CAPTURED" else action,
                         instruction=f"{self.target} captured" if phase == "CAPTURED" else ACTION_TEXT[action],
                         magnitude=float(np.max(np.abs(offset))) if action != "HOLD" else 0.0,
                         image=frame.image, frame_index=frame.index, t=frame.t, **common)


def icon_states(image: np.ndarray, target: str = "A4C") -> list[FakeState]:
    """One state per thing the instruction icon can show: every action, hold, captured, searching, unavailable,
    and an arrow over a black (blind) image."""
    common = dict(image=image, target=target, view=target, view_confidence=0.8, quality=0.3, fps=30.0,
                  source_name="scripted", model_name="oracle", precision="fp32")
    out = [FakeState(state="GUIDING", available=True, reasons=(), action=a, instruction=ACTION_TEXT[a],
                     magnitude=1.0, **common) for a in ACTIONS if a != "HOLD"]
    out.append(FakeState(state="HOLD", available=True, reasons=(), action="HOLD", instruction=ACTION_TEXT["HOLD"],
                         **{**common, "quality": 0.8}))
    out.append(FakeState(state="CAPTURED", available=True, reasons=(), action=None,
                         instruction=f"{target} captured", **{**common, "quality": 0.8}))
    out.append(FakeState(state="SEARCHING", available=True, reasons=(), action=None,
                         instruction=f"Looking for {target}: place the probe on the apex beat, below the left "
                                     "nipple, marker to the patient's left", **{**common, "view": OTHER}))
    out.append(FakeState(state="NO_SIGNAL", available=False, reasons=("frozen image",), action=None,
                         instruction="Guidance unavailable: frozen image", **common))
    from edge_app.engine import NO_HEART_IN_VIEW, with_reason
    out.append(FakeState(state="GUIDING", available=True, reasons=(), action="TILT_AWAY", magnitude=1.0,
                         instruction=with_reason(NO_HEART_IN_VIEW, ACTION_TEXT["TILT_AWAY"]),
                         frame_index=1, **{**common, "image": np.zeros_like(image), "view": OTHER, "quality": 0.0}))
    return out


@dataclass
class ScriptedEngine:
    """Shows `states` one after the other: state i until the app has saved screenshot i
    (POCUS_UI_SCREENSHOT_DIR), so screenshot i always shows state i however slow drawing is."""

    states: list
    shot_dir: str
    source: Any = None
    running = False

    def start(self):
        pass

    def stop(self):
        pass

    def latest(self):
        shown = len(list(Path(self.shot_dir).glob("shot_*.png")))
        return self.states[min(shown, len(self.states) - 1)]

    def set_target(self, view): pass
    def set_protocol(self, views): pass
    def capture_now(self): pass
    def start_recording(self, folder): pass
    def stop_recording(self): pass


def make_source(kind: str, stall_after_s: float | None, size_px: int = 256, start_view: str = "A4C",
                start_offset=START_OFFSET):
    """'fake' -> FakeProbe; 'sim' or 'auto' -> the simulator."""
    if kind == "auto":
        kind = "sim"
    if kind == "sim":
        from devices.base import create_source
        src = create_source(f"sim:seed=0,size={size_px}")
        src.set_pose(src.target_pose(start_view) - np.asarray(start_offset) * POSE_SCALE)  # off target
        if stall_after_s is not None:
            return StallingSource(src, stall_after_s)
        return src
    return FakeProbe(size=size_px, stall_after_s=stall_after_s, start_view=start_view, start_offset=start_offset)


class StallingSource(Source):
    """Wraps a source and stops delivering frames after `stall_after_s` (keeps move() working)."""

    def __init__(self, inner, stall_after_s: float):
        self.inner, self.stall_after_s = inner, stall_after_s
        self.name, self.fps = inner.name, inner.fps
        self._t0 = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open(self):
        self.inner.open()
        return self

    def close(self):
        self.inner.close()

    def read(self, timeout=None):
        self._t0 = self._t0 or time.monotonic()
        if time.monotonic() - self._t0 > self.stall_after_s:
            time.sleep(min(timeout or 0.0, 0.05))
            return None
        return self.inner.read(timeout)


def make_engine(kind: str, source, predictor: str = "oracle"):
    """'fake' -> FakeEngine; 'real' -> edge_app.engine.GuidanceEngine; 'auto' -> real if importable.

    The real engine runs `predictor`: "oracle" (the source's ground truth) or "bundle" (the shipped model).
    """
    if kind == "icons":
        image = FakeProbe().render(FAKE_TARGETS["A4C"], 0.0)
        return ScriptedEngine(icon_states(image), shot_dir=os.environ["POCUS_UI_SCREENSHOT_DIR"], source=FakeProbe())
    if kind in ("auto", "real"):
        try:
            from edge_app import engine as engine_mod
        except ImportError:
            if kind == "real":
                raise
        else:
            if predictor == "bundle":
                from edge_app.bundle import load_bundle
                return engine_mod.GuidanceEngine(source, engine_mod.BundlePredictor(load_bundle()))
            from edge_app.closed_loop import TruthPredictor
            return engine_mod.GuidanceEngine(source, TruthPredictor().tap(source))
    return FakeEngine(source)


class ConstantPredictor:
    """Always the same answer (A4C seen, target far: rotate clockwise); for `pocus app --predictor`."""

    name, precision = "constant", "fp32"

    def predict(self, image):
        from edge_app.engine import ModelOutput
        V, A = len(VIEWS), len(ACTIONS)
        view_probs = np.full(V + 1, 0.02, np.float32)
        view_probs[VIEWS.index("A4C")] = 0.9
        action_probs = np.full((V, A), 0.01, np.float32)
        action_probs[:, ACTIONS.index("ROTATE_CW")] = 0.9
        pose = np.zeros((V, 5), np.float32)
        pose[:, 2] = 1.2
        return ModelOutput(view_probs=view_probs / view_probs.sum(), quality=np.full(V, 0.3, np.float32),
                           action_probs=action_probs / action_probs.sum(1, keepdims=True), pose_offset=pose)


def make_constant_predictor():
    """Factory for `pocus app --predictor tests.helpers_ui:make_constant_predictor`."""
    return ConstantPredictor()


# ---------------------------------------------------------------------------------------------
# Running the app from a test and reading its screenshots
# ---------------------------------------------------------------------------------------------

def run_app(out_dir: Path, *helper_args: str, exit_after_s: float | None = 6.0, size: str = "1280x800",
            every_s: float = 1.0, env: dict | None = None, timeout_s: float = 90.0,
            background: bool = False):
    """Start the real app under xvfb-run in a subprocess (this file as the launcher).

    Returns the CompletedProcess (or the Popen when `background`). Screenshots land in out_dir.
    """
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, KIVY_NO_ARGS="1", KIVY_NO_CONSOLELOG="1", KIVY_HOME=str(out_dir / "kivy_home"),
                    POCUS_UI_SCREENSHOT_DIR=str(out_dir), POCUS_UI_SCREENSHOT_EVERY_S=str(every_s),
                    POCUS_UI_SIZE=size, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("LP_NUM_THREADS", "1")  # Mesa's software rasterizer: one thread, the box is shared
    if exit_after_s is not None:
        full_env["POCUS_UI_EXIT_AFTER_S"] = str(exit_after_s)
    cmd = ["xvfb-run", "-a", "-s", f"-screen 0 {size}x24", sys.executable, str(Path(__file__).resolve()),
           *helper_args]
    if background:
        return subprocess.Popen(cmd, env=full_env, cwd=str(ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout_s)


def load_shots(out_dir: Path) -> list[tuple[np.ndarray, dict]]:
    """[(rgb uint8 [H, W, 3], info dict)] for every shot_NNN.png/.json, in order."""
    import json

    import cv2

    shots = []
    for png in sorted(out_dir.glob("shot_*.png")):
        bgr = cv2.imread(str(png))
        assert bgr is not None, f"unreadable screenshot {png}"
        shots.append((bgr[:, :, ::-1].copy(), json.loads(png.with_suffix(".json").read_text())))
    return shots


def crop(rgb: np.ndarray, rect) -> np.ndarray:
    """Pixels of [left, top, width, height] (screenshot coordinates)."""
    x, y, w, h = rect
    return rgb[max(y, 0):y + h, max(x, 0):x + w]


def color_mask(rgb: np.ndarray, rgba, tol: int = 40) -> np.ndarray:
    """Pixels within `tol` (per channel, 0..255) of a UI colour given as RGBA 0..1."""
    target = np.array([round(c * 255) for c in rgba[:3]], dtype=np.int16)
    return (np.abs(rgb.astype(np.int16) - target) <= tol).all(axis=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Open the real POCUS UI for tests.")
    p.add_argument("--source", default="auto", choices=("auto", "fake", "sim"))
    p.add_argument("--engine", default="auto", choices=("auto", "fake", "real", "icons"))
    p.add_argument("--predictor", default="oracle", choices=("oracle", "bundle"),
                   help="what the real engine runs: the source's ground truth or the shipped model bundle")
    p.add_argument("--stall-after-s", type=float, default=None)
    p.add_argument("--size-px", type=int, default=256, help="image size of the probe")
    p.add_argument("--start-view", default="A4C", help="the probe starts a little short of this view")
    p.add_argument("--start-offset", default=",".join(map(str, START_OFFSET)),
                   help="normalized offset short of the start view, 5 numbers in POSE_AXES order")
    p.add_argument("--protocol", default=None, help="start this protocol (e.g. focused) before the window opens")
    p.add_argument("--keys", default="", help="comma list of SECONDS:KEYNAME to press, e.g. 1.5:right")
    p.add_argument("--tap", default="", help="comma list of SECONDS:WIDGET buttons to tap, e.g. 2:capture_button")
    p.add_argument("--follow", default="", help="START:END seconds during which keys follow the arrow on screen")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--fullscreen", action="store_true")
    p.add_argument("--record-base", default=None, help="the RECORD button records into this folder")
    p.add_argument("--readme-shot", default=None, metavar="PNG",
                   help="play the README scene (reach A4C, auto + manual capture, drift off) and save its "
                        "best guiding screenshot to PNG; run under xvfb-run -s '-screen 0 1280x800x24'")
    args = p.parse_args(argv)
    if args.readme_shot:
        return _readme_shot(args)
    # as `pocus app --record DIR` would set it, without recording from the launch
    args.record = str(Path(args.record_base) / "launch") if args.record_base else None
    if args.pid_file:
        Path(args.pid_file).write_text(str(os.getpid()))
    offset = tuple(float(v) for v in args.start_offset.split(","))
    source = make_source(args.source, args.stall_after_s, args.size_px, args.start_view, offset)
    engine = make_engine(args.engine, source, args.predictor)
    if args.protocol:
        engine.set_protocol(args.protocol)
    else:
        engine.set_target(args.start_view)
    print(f"ENGINE {type(engine).__module__}.{type(engine).__name__} SOURCE {type(source).__name__}", flush=True)
    _schedule_inputs(args.keys, args.tap, args.follow)
    from edge_app.ui import run_ui
    with source:  # the engine expects an open source (as `pocus app` does)
        rc = run_ui(engine, args)
        print(f"RUN_UI_RETURNED {rc}", flush=True)
        if not engine.running:
            print("ENGINE_STOPPED", flush=True)
    return rc


def _readme_shot(args) -> int:
    """The README screenshot: guidance after a capture, on the simulator (or the fake probe)."""
    import json
    import shutil
    import tempfile

    shots = Path(tempfile.mkdtemp(prefix="pocus_readme_"))
    os.environ.update(POCUS_UI_SCREENSHOT_DIR=str(shots), POCUS_UI_SCREENSHOT_EVERY_S="0.4",
                      POCUS_UI_EXIT_AFTER_S="8.5", POCUS_UI_SIZE=os.environ.get("POCUS_UI_SIZE", "1280x800"))
    drift = ",".join(f"{6.0 + 0.1 * i:.1f}:q" for i in range(4))  # rotate off the view again
    rc = main(["--source", args.source, "--engine", args.engine, "--predictor", args.predictor,
               "--follow", "1.0:3.0", "--tap", "5.6:capture_button", "--keys", drift])
    best = None
    for png in sorted(shots.glob("shot_*.png")):
        info = json.loads(png.with_suffix(".json").read_text())
        if info["display"]["kind"] == "guide" and info["captures_shown"] >= 1:
            best = png
    if best is None:
        print(f"no guiding screenshot with a capture in {shots}", file=sys.stderr)
        return 1
    shutil.copyfile(best, args.readme_shot)
    print(f"saved {best.name} as {args.readme_shot}")
    return rc


def _schedule_inputs(keys: str, taps: str, follow: str) -> None:
    """Schedule key presses and button taps on Kivy's clock, through the real widgets and events.

    keys: "SECONDS:KEYNAME,..." (Kivy key names: up, left, q, ...).
    taps: "SECONDS:WIDGET,..." where WIDGET is an app attribute (capture_button, record_button,
        protocol_button) or target_<VIEW>.
    follow: "START:END": between those seconds, every 0.15 s press the key of the arrow on screen,
        like a novice following the guidance in practice mode.
    """
    if not (keys or taps or follow):
        return
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    from kivy.clock import Clock

    from edge_app.ui.display import KEYMAP

    def app():
        from kivy.app import App
        return App.get_running_app()

    def press(name):
        from kivy.core.window import Keyboard, Window
        code = Keyboard.keycodes[name]
        Window.dispatch("on_key_down", code, 0, name if len(name) == 1 else None, [])
        Window.dispatch("on_key_up", code, 0)

    def tap(name):
        a = app()
        button = a.target_buttons[name[len("target_"):]] if name.startswith("target_") else getattr(a, name)
        button.trigger_action(0)

    key_of = {action: key for key, (action, _) in KEYMAP.items()}

    def follow_step(dt, end):
        if time.monotonic() > end:
            return False
        key = key_of.get(app().display.icon)
        if key:
            press(key)
        return True

    def schedule(dt):  # on the first frame, so the times count from the window's start
        for item in filter(None, keys.split(",")):
            at, _, name = item.partition(":")
            Clock.schedule_once(lambda dt, n=name: press(n), float(at))
        for item in filter(None, taps.split(",")):
            at, _, name = item.partition(":")
            Clock.schedule_once(lambda dt, n=name: tap(n), float(at))
        if follow:
            start, end = (float(v) for v in follow.split(":"))
            t_end = time.monotonic() + end
            Clock.schedule_once(lambda dt: Clock.schedule_interval(lambda dt2: follow_step(dt2, t_end), 0.15),
                                start)
    Clock.schedule_once(schedule, 0)


if __name__ == "__main__":
    sys.exit(main())
