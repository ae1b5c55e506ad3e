"""The bedside Kivy app: reads `engine.latest()` on a clock and draws it; never blocks on the engine.

Import this module only through `edge_app.ui.run_ui` (it configures the window before Kivy opens it).

Hidden test hooks (environment variables, used by tests/test_ui_*.py):
    POCUS_UI_SCREENSHOT_DIR: save a screenshot of the real window (shot_NNN.png) with a JSON
        sidecar (state, what is shown, widget rectangles in image pixels) every
        POCUS_UI_SCREENSHOT_EVERY_S seconds (default 1.0).
    POCUS_UI_EXIT_AFTER_S: close the app after this many seconds.
    POCUS_UI_EXIT_AFTER_SHOTS: close the app once this many screenshots are saved.
    POCUS_UI_SIZE: window size "WIDTHxHEIGHT" (default 1280x800).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from kivy.app import App
from kivy.clock import Clock
from kivy.core.window import Keyboard, Window
from kivy.logger import Logger
from kivy.metrics import dp, sp
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.floatlayout import FloatLayout
from kivy.uix.label import Label
from kivy.uix.scrollview import ScrollView
from kivy.uix.togglebutton import ToggleButton
from kivy.uix.widget import Widget

from devices.labels import VIEWS
from edge_app.ui.display import COLORS, KEY_HELP, KEYMAP, PRACTICE_STEP, describe, is_practice_source
from edge_app.ui.widgets import Banner, CaptureStrip, InstructionIcon, LiveImage, PanelBox, QualityMeter

_KEY_NAMES = {code: name for name, code in Keyboard.keycodes.items()}
TICK_HZ = 30.0       # how often the UI reads engine.latest()
TOUCH_DP = 56        # button height: above the 48 dp minimum touch target
FONT_SP = 20


def _button(text: str, **kwargs) -> Button:
    kwargs.setdefault("font_size", sp(FONT_SP))
    kwargs.setdefault("bold", True)
    return Button(text=text, **kwargs)


class PocusApp(App):
    """The bedside screen on top of a running `GuidanceEngine` (or anything with its API).

    Args:
        engine: object with latest(), set_target(view), set_protocol(views), capture_now(),
            start_recording(folder), stop_recording() and a `source` attribute.
        args: argparse namespace of `pocus app`; the RECORD button records beside `args.record`
            (the launch recording folder) when set, else under runs/recordings/.
    """

    title = "POCUS Guide"

    def __init__(self, engine: Any, args: Any = None, **kwargs):
        super().__init__(**kwargs)
        self.engine = engine
        self.args = args
        self.practice = is_practice_source(getattr(engine, "source", None))
        self.views = tuple(getattr(engine, "views", None) or VIEWS)  # the model's targets
        self.display = describe(None)
        self.state = None
        self._last_frame_index = None
        self._n_captures = 0
        self._message_until = 0.0
        self._last_problem = None
        self._tick_ms: list[float] = []
        self._t0 = time.monotonic()
        self._shots = 0
        self._rng = np.random.default_rng()

    # ---------- layout ----------
    def build(self):
        Window.clearcolor = COLORS["background"]
        root = BoxLayout(orientation="vertical")

        top = PanelBox(orientation="horizontal", size_hint_y=None, height=dp(TOUCH_DP + 16),
                       padding=dp(8), spacing=dp(8))
        top.add_widget(Label(text="Target", font_size=sp(FONT_SP), color=COLORS["muted"],
                             size_hint_x=None, width=dp(70)))
        self.target_buttons: dict[str, ToggleButton] = {}
        for view in self.views:
            b = ToggleButton(text=view, group="target", allow_no_selection=False, font_size=sp(22),
                             bold=True, size_hint_x=None, width=dp(96))
            b.bind(on_release=lambda btn, v=view: self._call("set_target", v))
            self.target_buttons[view] = b
            top.add_widget(b)
        self.protocol_button = ToggleButton(text="Protocol", font_size=sp(22), bold=True,
                                            size_hint_x=None, width=dp(130))
        self.protocol_button.bind(on_release=lambda *_: self._toggle_protocol())
        top.add_widget(self.protocol_button)
        self.view_label = Label(text="", font_size=sp(28), bold=True, halign="right", valign="middle")
        self.view_label.bind(size=lambda w, s: setattr(w, "text_size", s))
        top.add_widget(self.view_label)
        root.add_widget(top)

        middle = BoxLayout(orientation="horizontal")
        image_area = BoxLayout(orientation="vertical")
        self.banner = Banner(size_hint_y=None, height=dp(76))
        image_area.add_widget(self.banner)
        # The stage: instruction icon at its top-left, image beside it (or under it on a narrow
        # stage, see _place_stage), quality meter standing at its right edge.
        stage = FloatLayout()
        self.live = LiveImage(size_hint=(None, None))
        self.guide_icon = InstructionIcon(size_hint=(None, None))
        self.meter = QualityMeter(size_hint=(None, None))
        for w in (self.live, self.guide_icon, self.meter):
            stage.add_widget(w)
        stage.bind(pos=self._place_stage, size=self._place_stage)
        self.stage = stage
        image_area.add_widget(stage)
        middle.add_widget(image_area)

        side = PanelBox(orientation="vertical", size_hint_x=None, width=dp(300), padding=dp(10),
                        spacing=dp(10))
        self.protocol_label = Label(text="", font_size=sp(20), bold=True, color=COLORS["text"],
                                    size_hint_y=None, height=dp(30))
        side.add_widget(self.protocol_label)
        self.capture_button = _button("CAPTURE", size_hint_y=None, height=dp(84), font_size=sp(28),
                                      background_normal="", background_color=(0.10, 0.45, 0.25, 1))
        self.capture_button.bind(on_release=lambda *_: self._call("capture_now"))
        side.add_widget(self.capture_button)
        self.record_button = _button("RECORD", size_hint_y=None, height=dp(TOUCH_DP + 8),
                                     background_normal="", background_color=(0.30, 0.32, 0.36, 1))
        self.record_button.bind(on_release=lambda *_: self._toggle_record())
        side.add_widget(self.record_button)
        side.add_widget(Label(text="Captured clips", font_size=sp(18), color=COLORS["muted"],
                              size_hint_y=None, height=dp(28)))
        scroll = ScrollView(do_scroll_x=False, bar_width=dp(6))
        self.strip = CaptureStrip()
        scroll.add_widget(self.strip)
        side.add_widget(scroll)
        middle.add_widget(side)
        root.add_widget(middle)

        if self.practice:
            root.add_widget(self._practice_bar())
        self.status = Label(text="", font_size=sp(16), color=COLORS["muted"], size_hint_y=None,
                            height=dp(30), halign="left", valign="middle", padding=(dp(10), 0))
        self.status.bind(size=lambda w, s: setattr(w, "text_size", s))
        status_box = PanelBox(size_hint_y=None, height=dp(30))
        status_box.add_widget(self.status)
        root.add_widget(status_box)
        return root

    def _practice_bar(self) -> Widget:
        box = PanelBox(bg=(0.10, 0.12, 0.16, 1), orientation="vertical", size_hint_y=None,
                       height=dp(TOUCH_DP + 34), padding=(dp(8), dp(4)), spacing=dp(2))
        row = BoxLayout(orientation="horizontal", spacing=dp(6))
        row.add_widget(Label(text="PRACTICE", bold=True, font_size=sp(18), color=COLORS["arrow"],
                             size_hint_x=None, width=dp(100)))
        for key, (action, label) in KEYMAP.items():
            b = _button(f"{label}\n[size=14sp][color=b0b8c0]{key.capitalize()}[/color][/size]",
                        font_size=sp(17), markup=True, halign="center")
            b.bind(on_release=lambda *_, a=action: self.move_probe(a))
            row.add_widget(b)
        if callable(getattr(self.engine.source, "sample_pose", None)):
            new = _button("New start", font_size=sp(17), size_hint_x=None, width=dp(110))
            new.bind(on_release=lambda *_: self._new_start())
            row.add_widget(new)
        box.add_widget(row)
        box.add_widget(Label(text=KEY_HELP, font_size=sp(15), color=COLORS["muted"], size_hint_y=None,
                             height=dp(22)))
        return box

    def _place_stage(self, stage, *_):
        pad = dp(10)
        meter_w = dp(150)
        self.meter.size = (meter_w, stage.height - 2 * pad)
        self.meter.pos = (stage.right - meter_w - pad, stage.y + pad)
        image_w = stage.width - meter_w - 2 * pad
        side = min(stage.height * 0.5, stage.width * 0.28, dp(400))
        self.guide_icon.size = (side, side + dp(36))
        self.guide_icon.pos = (stage.x + pad, stage.top - self.guide_icon.height - pad)
        # On a wide stage the image goes right of the icon, so the icon (and its caption) never
        # covers the sector; on a narrow one it keeps the full width, the icon over its top-left
        # corner, which the sector leaves black.
        beside = image_w - side - pad
        left = side + pad if beside >= stage.height else 0.0
        self.live.size = (image_w - left, stage.height)
        self.live.pos = (stage.x + left, stage.y)

    # ---------- engine calls (never let a UI tap crash the screen) ----------
    def _call(self, method: str, *args) -> None:
        try:
            getattr(self.engine, method)(*args)
        except Exception as e:  # noqa: BLE001 - show the reason on screen; the scan goes on
            self.flash(f"{method} failed: {e}")
            Logger.warning(f"POCUS: {method}{args} failed: {e}")

    def _toggle_protocol(self) -> None:
        """Start the protocol (`pocus app --protocol NAME`, else every view in order), or end it."""
        if self.state is not None and getattr(self.state, "protocol", ()):
            self._call("set_protocol", ())
        else:
            self._call("set_protocol", getattr(self.args, "protocol", None) or self.views)

    def _toggle_record(self) -> None:
        if self.state is not None and getattr(self.state, "recording", False):
            self._call("stop_recording")
            return
        # Beside the launch recording (`pocus app --record DIR`) when there is one, else runs/recordings.
        launch = getattr(self.args, "record", None)
        base = Path(launch).parent if launch else Path("runs") / "recordings"
        self._call("start_recording", str(base / time.strftime("session_%Y%m%d_%H%M%S")))

    def move_probe(self, action: str) -> None:
        """Practice mode: move the virtual probe by one PRACTICE_STEP along `action`."""
        if self.practice:
            try:
                self.engine.source.move(action, PRACTICE_STEP)
            except Exception as e:  # noqa: BLE001 - a bad move must not close the app
                self.flash(f"move failed: {e}")

    def _new_start(self) -> None:
        src = self.engine.source
        try:
            src.set_pose(src.sample_pose(self._rng, "window"))
        except Exception as e:  # noqa: BLE001
            self.flash(f"new start failed: {e}")

    def flash(self, message: str, seconds: float = 4.0) -> None:
        """Show a short message in the status bar for a few seconds."""
        self.status.text = message
        self.status.color = COLORS["unavailable"]
        self._message_until = time.monotonic() + seconds

    def _on_key_down(self, window, key, scancode, codepoint, modifiers):
        name = _KEY_NAMES.get(key) or (codepoint or "").lower()
        if name in KEYMAP and self.practice:
            self.move_probe(KEYMAP[name][0])
            return True
        if name == "c":
            self._call("capture_now")
            return True
        return False

    # ---------- the clock ----------
    def on_start(self):
        Window.bind(on_key_down=self._on_key_down)
        Clock.schedule_interval(self.tick, 1.0 / TICK_HZ)
        Clock.schedule_once(self._test_hooks, 0)  # on the first frame, so timers count from there

    def _test_hooks(self, dt: float = 0.0) -> None:
        self._t0 = time.monotonic()
        shot_dir = os.environ.get("POCUS_UI_SCREENSHOT_DIR")
        if shot_dir:
            Path(shot_dir).mkdir(parents=True, exist_ok=True)
            every = float(os.environ.get("POCUS_UI_SCREENSHOT_EVERY_S", "1.0"))
            Clock.schedule_interval(lambda dt: self.request_screenshot(shot_dir), every)
            Window.bind(on_flip=self._on_flip)
        exit_after = os.environ.get("POCUS_UI_EXIT_AFTER_S")
        if exit_after:
            Clock.schedule_once(lambda dt: self.stop(), float(exit_after))

    def on_stop(self):
        Clock.unschedule(self.tick)
        Window.unbind(on_key_down=self._on_key_down)

    def tick(self, dt: float = 0.0) -> None:
        """Read the engine's latest state (non-blocking) and update every widget from it."""
        t0 = time.perf_counter()
        try:
            state = self.engine.latest()
        except Exception as e:  # noqa: BLE001 - an engine bug shows as "unavailable", not a crash
            state = None
            self.display = describe(None)
            self.banner.show(f"Guidance unavailable: engine error: {e}", "unavailable")
            return
        self.state = state
        d = self.display = describe(state)
        self.banner.show(d.banner, d.kind)
        self.guide_icon.show(d.icon, d.caption, d.hold_progress)
        self.meter.threshold, self.meter.quality = d.threshold, d.quality
        self.meter.active = d.kind != "unavailable"
        self.meter.title = f"{d.target} quality" if d.target else "Quality"
        self.view_label.text = d.view_text
        self.protocol_label.text = d.protocol_text
        for view, b in self.target_buttons.items():
            b.state = "down" if view == d.target else "normal"
        self.protocol_button.state = "down" if d.protocol_text else "normal"
        self.record_button.text = "STOP REC" if d.recording else "RECORD"
        self.record_button.background_color = COLORS["record"] if d.recording else (0.30, 0.32, 0.36, 1)
        problem = (getattr(self.engine, "recording_error", None) or getattr(self.engine, "capture_error", None))
        if problem and problem != self._last_problem:
            self.flash(str(problem), seconds=8.0)
        self._last_problem = problem
        if time.monotonic() >= self._message_until:
            self.status.text, self.status.color = d.status_text, COLORS["muted"]

        image = getattr(state, "image", None)
        index = getattr(state, "frame_index", None)
        if image is not None and index != self._last_frame_index:
            self.live.set_image(image)
            self._last_frame_index = index
        captures = tuple(getattr(state, "captures", ()) or ())
        for cap in captures[self._n_captures:]:
            self.strip.add_capture(cap, image, threshold=d.threshold)
        self._n_captures = len(captures)
        self._tick_ms.append(1000 * (time.perf_counter() - t0))
        del self._tick_ms[:-300]

    # ---------- test hook ----------
    def _rect_px(self, rect) -> list[int]:
        """Kivy (x, y, w, h), y up -> screenshot pixels [left, top, width, height], y down."""
        x, y, w, h = rect
        return [int(round(x)), int(round(Window.height - y - h)), int(round(w)), int(round(h))]

    def _min_touch_px(self) -> list[int]:
        """Smallest width and height over every button on screen (touch targets), in pixels."""
        sizes = [w.size for w in self.root.walk() if isinstance(w, ButtonBehavior)]
        return [int(min(s[0] for s in sizes)), int(min(s[1] for s in sizes))]

    def request_screenshot(self, folder: str) -> None:
        """Save a screenshot of the next drawn frame (see `save_screenshot`)."""
        self._shot_folder = folder
        Window.canvas.ask_update()

    def _on_flip(self, *_):
        # Called after the frame is drawn and before the buffers swap: the back buffer holds
        # exactly the frame of the current widget state, so picture and JSON always agree.
        folder, self._shot_folder = getattr(self, "_shot_folder", None), None
        if folder:
            self.save_screenshot(folder)

    def save_screenshot(self, folder: str) -> str:
        """Save the real window to folder/shot_NNN.png plus shot_NNN.json (what is shown, where)."""
        raw = Window.screenshot(name=str(Path(folder) / "raw.png"))
        out = Path(folder) / f"shot_{self._shots:03d}.png"
        s = self.state
        info = {
            "t_s": time.monotonic() - self._t0,
            "window": list(Window.size),
            "display": asdict(self.display),
            "state": None if s is None else {
                k: getattr(s, k, None) for k in ("state", "available", "reasons", "view", "target",
                                                 "action", "quality", "frame_index", "magnitude")},
            "practice": self.practice,
            "rects": {
                "image": self._rect_px(self.live.image_rect()),
                "icon": self._rect_px((*self.guide_icon.pos, *self.guide_icon.size)),
                "meter_bar": self._rect_px(self.meter.bar_rect()),
                "banner": self._rect_px((*self.banner.pos, *self.banner.size)),
                "capture_button": self._rect_px((*self.capture_button.pos, *self.capture_button.size)),
                **{f"target_{v}": self._rect_px((*b.pos, *b.size)) for v, b in self.target_buttons.items()},
            },
            "min_touch_px": self._min_touch_px(),
            "texture_creations": self.live.texture_creations,
            "blits": self.live.blits,
            "captures_shown": self.strip.count,
            "ui_fps": Clock.get_fps(),
            "tick_ms_mean": float(np.mean(self._tick_ms)) if self._tick_ms else None,
            "tick_ms_max": float(np.max(self._tick_ms)) if self._tick_ms else None,
        }
        out.with_suffix(".json").write_text(json.dumps(info, indent=1, default=_jsonable))
        shutil.move(raw, out)  # the PNG last: a shot_NNN.png always has its JSON
        self._shots += 1
        max_shots = os.environ.get("POCUS_UI_EXIT_AFTER_SHOTS")
        if max_shots and self._shots >= int(max_shots):
            Clock.schedule_once(lambda dt: self.stop(), 0)
        return str(out)


def _jsonable(o: Any) -> Any:
    """numpy scalars -> Python numbers; anything else -> str (screenshot sidecars only)."""
    return o.item() if isinstance(o, np.generic) else str(o)
