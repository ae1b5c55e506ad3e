"""The bedside Kivy screen. `import edge_app.ui` stays light: Kivy is imported inside `run_ui`.

Screen (1280x800 and up, touch targets >= 48 dp):
    top bar      target buttons PLAX PSAX A4C A2C SC4C + Protocol (toggle), "Seeing: <view> <conf>%"
    banner       the instruction sentence, large; amber "Guidance unavailable: <reason>" when the
                 engine withholds guidance, green for hold still / captured
    stage        the live image (one texture, updated in place), the instruction icon over its
                 top-left corner (arrow on a body pictogram, rotation arc, tilt/rock fan, hold hand
                 with the auto-capture countdown ring, warning triangle), and the quality meter
                 for the target with the capture level marked (grey while unavailable)
    side panel   protocol progress, CAPTURE, RECORD / STOP REC, captured clips (thumbnails)
    practice bar only on a movable virtual probe (devices.sim): buttons and keys that move it
                 (arrows slide, Q/E rotate, W/S tilt, A/D rock, C capture)
    status bar   source, fps, latency, model (precision), dropped frames, engine state

The UI reads `engine.latest()` 30 times a second and never waits on the engine; `edge_app.ui.display`
turns a state into words and colours without Kivy, so it is tested without a window.
"""
from __future__ import annotations

import os
from typing import Any

DEFAULT_SIZE = (1280, 800)


def _window_size(args: Any) -> tuple[int, int]:
    """Window size from args.window_size or env POCUS_UI_SIZE ("1920x1080"), else 1280x800."""
    spec = getattr(args, "window_size", None) or os.environ.get("POCUS_UI_SIZE")
    if not spec:
        return DEFAULT_SIZE
    try:
        w, h = (int(v) for v in str(spec).lower().split("x"))
    except ValueError:
        raise ValueError(f"window size '{spec}' is not WIDTHxHEIGHT, e.g. 1280x800") from None
    if w < 320 or h < 240:
        raise ValueError(f"window size '{spec}' is too small: at least 320x240")
    return w, h


def run_ui(engine: Any, args: Any = None) -> int:
    """Open the bedside screen on `engine` and run until the window is closed.

    Starts the engine before the window opens and stops it when the window closes (also after an
    error), so closing the window never leaves engine threads behind.

    Args:
        engine: a `edge_app.engine.GuidanceEngine` (or an object with the same API), not started.
        args: the `pocus app` namespace; uses `fullscreen` (bool), `record` (folder for recordings)
            and optionally `window_size` ("1280x800").

    Returns:
        0 when the window was closed normally.

    Raises:
        ValueError: bad window size. Errors from `engine.start()` (e.g. SourceError) pass through.
    """
    size = _window_size(args)
    os.environ.setdefault("KIVY_NO_ARGS", "1")  # Kivy must not parse the pocus command line
    from kivy.config import Config  # noqa: PLC0415 - lazy: Kivy only when a window is wanted

    Config.set("graphics", "width", str(size[0]))
    Config.set("graphics", "height", str(size[1]))
    Config.set("graphics", "fullscreen", "auto" if getattr(args, "fullscreen", False) else "0")
    Config.set("input", "mouse", "mouse,multitouch_on_demand")  # no red dots on right click
    Config.set("kivy", "exit_on_escape", "1")

    engine.start()  # source errors surface here, before a window opens
    try:
        from edge_app.ui.app import PocusApp  # noqa: PLC0415 - importing it opens the window

        PocusApp(engine, args).run()
    finally:
        engine.stop()
    return 0


__all__ = ["run_ui"]
