"""Headless mode: the same engine as the bedside screen, reported in the terminal.

Two outputs:
- a live status line (carriage return on a terminal, one line per second when piped):
  state, view, quality, instruction, fps, latency, drops, captures;
- `json_lines=True`: one JSON object per processed frame (plus one when a frame-less update
  changes the state, e.g. NO_SIGNAL after the source stalls), then a final summary object
  `{"summary": true, "frames", "drops", "fps", "latency_ms_p50", "latency_ms_p99", "captures", ...}`.
"""
from __future__ import annotations

import json
import math
import queue
import shutil
import sys
import time
from typing import Any, TextIO

from edge_app.engine import GuidanceEngine, GuidanceState


def state_to_json(state: GuidanceState) -> dict[str, Any]:
    """The JSON-friendly fields of a state (no image), floats rounded for reading."""
    return {
        "frame": state.frame_index, "t": round(state.t, 4), "state": state.state,
        "available": state.available, "reasons": list(state.reasons), "view": state.view,
        "view_confidence": round(state.view_confidence, 4), "target": state.target,
        "quality": round(state.quality, 4), "quality_threshold": round(state.quality_threshold, 4),
        "capture_level": round(state.capture_level, 4),
        "action": state.action, "instruction": state.instruction, "magnitude": round(state.magnitude, 3),
        "hold_progress": round(state.hold_progress, 3), "fps": round(state.fps, 2),
        "latency_ms": round(state.latency_ms, 3), "dropped": state.dropped_frames,
        "captures": len(state.captures), "protocol_step": state.protocol_step, "recording": state.recording,
    }


def status_line(state: GuidanceState, width: int = 120) -> str:
    """One terminal line for a state, cut to `width` characters."""
    view = f"{state.view} {state.view_confidence:4.0%}" if state.view else "-"
    text = (f"{state.state:<9} | view {view} | target {state.target} q {state.quality:.2f}/"
            f"{state.capture_level:.2f} | {state.instruction} | {state.fps:4.1f} fps "
            f"{state.latency_ms:5.1f} ms | drops {state.dropped_frames} | captures {len(state.captures)}")
    return text[:width]


def summarize(engine: GuidanceEngine, elapsed_s: float, end: str) -> dict[str, Any]:
    """Final figures of a run: frames, drops, fps, latency p50/p99 (ms), captures, states."""
    stats = engine.stats.summary()
    lat = stats["latency_ms"]
    state = engine.latest()
    return {
        "summary": True, "end": end, "seconds": round(elapsed_s, 3),
        "frames": stats["processed"], "received": stats["received"], "drops": state.dropped_frames,
        "fps": round(stats["processed"] / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "latency_ms_p50": lat["p50"], "latency_ms_p99": lat["p99"],
        "states": stats["states"],
        "captures": [{"view": c.view, "quality": round(c.quality, 4), "path": c.path, "t": round(c.t, 3),
                      "auto": c.auto, "best_achievable": c.best_achievable} for c in state.captures],
        "source": engine.source_name, "model": engine.predictor.name, "precision": engine.predictor.precision,
        "error": None if engine.error is None else str(engine.error),
        "capture_error": engine.capture_error, "recording_error": engine.recording_error,
    }


def run_headless(engine: GuidanceEngine, seconds: float | None = None, json_lines: bool = False,
                 out: TextIO | None = None, refresh_s: float = 0.1) -> dict[str, Any]:
    """Run `engine` until `seconds` pass, a finite source ends, or Ctrl-C; print as it goes.

    Args:
        engine: a GuidanceEngine, not started (its source already open).
        seconds: wall-clock limit; None = until the source ends or Ctrl-C.
        json_lines: one JSON line per frame and a JSON summary instead of the status line.
        out: where to print (default sys.stdout).
        refresh_s: status line refresh period.

    Returns:
        The summary dict (also printed).

    Raises:
        The source's or the engine's error after the summary is printed (e.g. a SourceError).
    """
    out = out or sys.stdout
    states = engine.subscribe() if json_lines else None
    tty = hasattr(out, "isatty") and out.isatty()
    width = shutil.get_terminal_size((120, 20)).columns - 1
    end = "end of source"
    t0 = time.monotonic()
    last_print = -math.inf
    engine.start()
    try:
        while not engine.done:
            if seconds is not None and time.monotonic() - t0 >= seconds:
                end = "time limit"
                break
            if states is not None:
                _drain(states, out, timeout=refresh_s)
            else:
                time.sleep(refresh_s)
                now = time.monotonic()
                if tty:
                    out.write("\r" + status_line(engine.latest(), width).ljust(width))
                    out.flush()
                elif now - last_print >= 1.0:
                    out.write(status_line(engine.latest(), width) + "\n")
                    out.flush()
                    last_print = now
    except KeyboardInterrupt:
        end = "interrupted"
    finally:
        engine.stop()
    elapsed = time.monotonic() - t0
    if states is not None:
        _drain(states, out, timeout=0.0)
    if engine.error is not None:
        end = "error"
    summary = summarize(engine, elapsed, end)
    if json_lines:
        out.write(json.dumps(summary) + "\n")
    else:
        if tty:
            out.write("\n")
        lat = (f"{summary['latency_ms_p50']:.1f}/{summary['latency_ms_p99']:.1f} ms"
               if summary["latency_ms_p50"] is not None else "-")
        out.write(f"{summary['frames']} frames in {elapsed:.1f} s ({summary['fps']:.1f} fps), "
                  f"{summary['drops']} dropped, latency p50/p99 {lat}, {len(summary['captures'])} captures "
                  f"({summary['end']})\n")
        for cap in summary["captures"]:
            out.write(f"  captured {cap['view']} q={cap['quality']:.2f} -> {cap['path'] or '(not saved)'}\n")
    out.flush()
    if engine.error is not None:
        raise engine.error
    return summary


def _drain(states: queue.Queue, out: TextIO, timeout: float) -> None:
    """Print every queued state as a JSON line, waiting up to `timeout` for the first."""
    try:
        state = states.get(timeout=timeout) if timeout > 0 else states.get_nowait()
    except queue.Empty:
        return
    lines = [json.dumps(state_to_json(state))]
    while True:
        try:
            lines.append(json.dumps(state_to_json(states.get_nowait())))
        except queue.Empty:
            break
    out.write("\n".join(lines) + "\n")
    out.flush()
