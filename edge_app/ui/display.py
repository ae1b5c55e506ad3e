"""What the screen shows for a guidance state: words, colours, icon and key map. No Kivy here.

The Kivy widgets only draw what `describe(state)` returns, so the wording and the colour rules are
testable without a window, and the UI tests can look for the same colours in screenshots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devices.labels import ACTION_TEXT, ACTIONS, MOVE_SIZES, QUALITY_DIAGNOSTIC, move_size

# RGBA in 0..1. Bright, distinct hues that read on a grayscale ultrasound image.
COLORS: dict[str, tuple[float, float, float, float]] = {
    "background": (0.06, 0.07, 0.09, 1.0),
    "panel": (0.12, 0.14, 0.17, 1.0),
    "text": (0.95, 0.96, 0.97, 1.0),
    "muted": (0.62, 0.66, 0.70, 1.0),
    "arrow": (1.0, 0.83, 0.0, 1.0),         # instruction arrows: yellow
    "hold": (0.18, 0.80, 0.44, 1.0),        # hold still / captured / diagnostic: green
    "unavailable": (1.0, 0.62, 0.0, 1.0),   # guidance unavailable: amber
    "searching": (0.55, 0.75, 1.0, 1.0),    # looking for a view: light blue
    "quality_low": (0.91, 0.30, 0.24, 1.0),  # quality bar below the diagnostic threshold: red
    "quality_ok": (0.18, 0.80, 0.44, 1.0),   # at or above it: green
    "threshold": (1.0, 1.0, 1.0, 1.0),
    "record": (0.90, 0.15, 0.15, 1.0),
    "marker": (0.18, 0.80, 0.44, 1.0),      # the probe's index marker dot
}

# Practice mode: Kivy key name -> (ACTIONS name, label on the on-screen button).
# Left/right follow the body pictogram (patient seen from the front: the patient's left is on the
# screen's right), so the key to press points the same way as the arrow on screen.
KEYMAP: dict[str, tuple[str, str]] = {
    "up": ("SLIDE_HEAD", "Head"),
    "down": ("SLIDE_FEET", "Feet"),
    "left": ("SLIDE_RIGHT", "Pt right"),
    "right": ("SLIDE_LEFT", "Pt left"),
    "q": ("ROTATE_CCW", "Rot CCW"),
    "e": ("ROTATE_CW", "Rot CW"),
    "w": ("TILT_MARKER", "Tilt mark"),
    "s": ("TILT_AWAY", "Tilt away"),
    "d": ("ROCK_MARKER", "Rock mark"),
    "a": ("ROCK_AWAY", "Rock away"),
}
KEY_HELP = ("Keys: Up/Down head/feet, Left/Right patient's right/left, Q/E rotate, W/S tilt, "
            "A/D rock, C capture")
# Normalized pose units per key press or button tap (1 unit is about one novice adjustment).
PRACTICE_STEP = 0.25

# Icons the instruction widget knows how to draw, besides one per ACTIONS name.
ICON_UNAVAILABLE = "UNAVAILABLE"
ICON_SEARCHING = "SEARCHING"
ICON_CAPTURED = "CAPTURED"


def capture_label(capture: Any) -> str:
    """The clip list's line for one capture: view, quality, and how it was taken when not by the usual
    auto-capture (the CAPTURE button, or the best a poor window gives after a long steady hold)."""
    how = ("  manual" if getattr(capture, "auto", True) is False
           else "  best achievable" if getattr(capture, "best_achievable", False) else "")
    return f"[b]{getattr(capture, 'view', '?')}[/b]  q {float(getattr(capture, 'quality', 0.0)):.2f}{how}"


@dataclass(frozen=True)
class Display:
    """Everything the screen shows for one state, as plain values.

    Attributes:
        kind: "guide", "hold", "captured", "searching" or "unavailable" (picks the banner colour).
        icon: an ACTIONS name or one of ICON_UNAVAILABLE / ICON_SEARCHING / ICON_CAPTURED.
        banner: the one sentence shown in large text.
        caption: a short word under the icon ("SLIDE", "ROTATE", "small move", ...).
        view_text: current view and confidence, e.g. "Seeing A4C  87%".
        target: target view name.
        quality: smoothed quality for the target, 0..1.
        threshold: quality at which the app auto-captures (capture level), 0..1.
        protocol_text: "Protocol 2/5: PSAX" or "" when no protocol runs.
        status_text: one line for the status bar.
        recording: whether the session is being recorded.
        hold_progress: 0..1 of the hold time before the auto-capture (drawn around the hold icon).
    """

    kind: str
    icon: str
    banner: str
    caption: str
    view_text: str
    target: str
    quality: float
    threshold: float
    protocol_text: str
    status_text: str
    recording: bool
    hold_progress: float = 0.0


def unavailable_text(reasons: tuple[str, ...] | list[str] | None, instruction: str = "") -> str:
    """The banner when guidance is unavailable: 'Guidance unavailable: <reasons>'."""
    if instruction and instruction.lower().startswith("guidance unavailable"):
        return instruction
    why = "; ".join(r for r in (reasons or ()) if r) or "no guidance state yet"
    return f"Guidance unavailable: {why}"


def _magnitude_caption(action: str, magnitude: float) -> str:
    return f"{action.split('_')[0].capitalize()}: {MOVE_SIZES[move_size(magnitude)]} move"


def _f(value: Any, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if out == out else default  # NaN -> default


def describe(state: Any) -> Display:
    """Turn a GuidanceState (or None before the first one) into what the screen shows.

    Args:
        state: an `edge_app.engine.GuidanceState`, any object with the same attribute names, or None.

    Returns:
        The `Display` for that state. An unavailable state never gets an arrow: its icon is
        ICON_UNAVAILABLE and its banner "Guidance unavailable: <reason>".
    """
    get = (lambda name, default=None: getattr(state, name, default))  # noqa: E731
    quality = min(max(_f(get("quality")), 0.0), 1.0)
    # the meter marks where auto-capture starts (diagnostic threshold plus the engine's safety margin)
    threshold = min(max(_f(get("capture_level", get("quality_threshold")), QUALITY_DIAGNOSTIC), 0.0), 1.0)
    target = str(get("target") or "")
    phase = str(get("state") or "NO_SIGNAL")
    action = get("action")
    available = bool(get("available", False)) and state is not None

    if not available:
        kind, icon, caption = "unavailable", ICON_UNAVAILABLE, "NO GUIDANCE"
        banner = unavailable_text(tuple(get("reasons") or ()), str(get("instruction") or ""))
    elif phase == "CAPTURED":
        kind, icon, caption = "captured", ICON_CAPTURED, "CAPTURED"
        banner = str(get("instruction") or f"{target} captured")
    elif phase == "HOLD" or action == "HOLD":
        kind, icon, caption = "hold", "HOLD", "HOLD STILL"
        banner = str(get("instruction") or ACTION_TEXT["HOLD"])
    elif action in ACTIONS:
        kind, icon = "guide", str(action)
        caption = _magnitude_caption(action, _f(get("magnitude")))
        banner = str(get("instruction") or ACTION_TEXT[action])
    else:
        kind, icon, caption = "searching", ICON_SEARCHING, "SEARCHING"
        banner = str(get("instruction") or "Looking for the heart: sweep slowly over the window")

    view = str(get("view") or "")
    if state is None or not view:
        view_text = "Seeing: -"
    elif view == "OTHER":
        view_text = "Seeing: no standard view"
    else:
        view_text = f"Seeing: {view}  {100 * _f(get('view_confidence')):.0f}%"

    protocol = tuple(get("protocol") or ())
    step = int(_f(get("protocol_step")))
    protocol_text = ""
    if protocol:
        shown = min(step, len(protocol) - 1)
        protocol_text = (f"Protocol done ({len(protocol)} views)" if step >= len(protocol)
                         else f"Protocol {shown + 1}/{len(protocol)}: {protocol[shown]}")

    if state is None:
        status = "Waiting for the engine..."
    else:
        status = (f"Source {get('source_name') or '?'}  |  {_f(get('fps')):.0f} fps  |  "
                  f"latency {_f(get('latency_ms')):.0f} ms  |  model {get('model_name') or '?'} "
                  f"({get('precision') or '?'})  |  dropped {int(_f(get('dropped_frames')))}  |  {phase}")
    return Display(kind=kind, icon=icon, banner=banner, caption=caption, view_text=view_text,
                   target=target, quality=quality, threshold=threshold, protocol_text=protocol_text,
                   status_text=status, recording=bool(get("recording", False)),
                   hold_progress=min(max(_f(get("hold_progress")), 0.0), 1.0) if kind == "hold" else 0.0)


def is_practice_source(source: Any) -> bool:
    """True when the source is a virtual probe the user can move (devices.sim.SimulatedProbe).

    Duck-typed on a callable `move(action, step)` so the UI needs no import of the simulator.
    """
    return callable(getattr(source, "move", None))
