"""`pocus bench e2e`: does the whole pipeline keep up with the probe, and how fast is it?

The simulated probe renders frames as fast as it can; a pacer releases them at `--fps` (a live
probe), so render time is measured apart from the pacing sleep. Frames go through the real engine
threads (latest-frame mailbox, int8 bundle by default, smoothing, gates, state machine).

Reported:
- keeps up: frames offered, processed and dropped by the mailbox (a backlog cannot grow: the
  mailbox holds one frame; drops are the symptom of a pipeline slower than the probe);
- latency from frame capture to published state, p50/p99 ms: capture = the moment the source
  starts producing the frame, so it includes the read/render, the mailbox wait, preprocess,
  inference and smoothing+gates; each stage's share of the mean;
- RSS at start (after warm-up) and end, its maximum and slope over the last 3/4 of the run (flat
  memory over --seconds 600).

The first `--warmup-s` seconds are left out of the figures (first inferences and page faults).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

from devices.base import Frame, Source
from edge_app.engine import BundlePredictor, EngineConfig, GuidanceEngine, timing_summary

TARGET_P50_MS = 10.0
TARGET_P99_MS = 25.0


def configure_bench_e2e(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add `pocus bench e2e` arguments; returns the function that runs it."""
    parser.description = ("Whole-pipeline benchmark on the simulated probe: does the engine keep up at the probe's "
                          "frame rate (drops), latency from frame capture to published guidance state (p50/p99 ms) "
                          "with each stage's share, and memory (RSS) over the run.")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured run length (default 20; use 600 "
                        "to check that memory stays flat)")
    parser.add_argument("--fps", type=float, default=60.0, help="probe frame rate (default 60)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds left out at the start (default 1)")
    parser.add_argument("--bundle", default=None, metavar="DIR", help="model bundle (default: the shipped one)")
    parser.add_argument("--profile", default="cpu", help="device profile (default cpu)")
    parser.add_argument("--precision", default="int8", choices=("int8", "fp32", "fp16"),
                        help="model file of the bundle (default int8)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: profile)")
    parser.add_argument("--seed", type=int, default=0, help="simulated patient")
    parser.add_argument("--view", default="A4C", help="probe starts at this view and guides toward it (default A4C)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result (with the config)")
    return run_bench_e2e


def run_bench_e2e(args: argparse.Namespace) -> int:
    """Run `pocus bench e2e`; returns the exit code (0 also when targets are missed: it is a measurement)."""
    if not args.seconds > 0 or not args.fps > 0:
        raise ValueError(f"--seconds and --fps must be > 0, got {args.seconds} and {args.fps}")
    from edge_app.app_cli import make_predictor

    args.predictor = None
    predictor = make_predictor(args) if args.threads is None else _predictor_with_threads(args)
    try:
        from devices.sim import SimulatedProbe
    except ImportError as e:
        raise ValueError(f"pocus bench e2e needs the simulator (devices/sim): {e}") from e
    probe = SimulatedProbe(patient_seed=args.seed, start_view=args.view, fps=args.fps, realtime=False)
    result = run_e2e(probe, predictor, seconds=args.seconds, fps=args.fps, warmup_s=args.warmup_s,
                     target=args.view, progress=True)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("predictor",) and not callable(v)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _predictor_with_threads(args: argparse.Namespace) -> Any:
    from edge_app.bundle import load_bundle

    return BundlePredictor(load_bundle(args.bundle, profile=args.profile, precision=args.precision,
                                       threads=args.threads))


class PacedSource(Source):
    """Releases the frames of a fast, unpaced source at `fps`, timing only the inner read.

    `read_ms(index)` gives how long the inner read of a recent frame took (the last 65536 frames
    are kept in fixed arrays, so memory stays flat).
    """

    _KEEP = 1 << 16

    def __init__(self, inner: Source, fps: float) -> None:
        self.inner = inner
        self.fps = fps
        self.name = getattr(inner, "name", "source")
        self.period_s = 1.0 / fps
        self._index = np.full(self._KEEP, -1, dtype=np.int64)
        self._ms = np.full(self._KEEP, np.nan)
        self.offered = 0
        self._next: float | None = None

    def read(self, timeout: float | None = None) -> Frame | None:
        now = time.perf_counter()
        self._next = now if self._next is None else self._next
        delay = self._next - now
        if timeout is not None and delay > timeout:
            time.sleep(timeout)
            return None
        if delay > 0:
            time.sleep(delay)
        # Never accumulate debt: a late frame does not make the next ones come faster.
        self._next = max(self._next + self.period_s, time.perf_counter())
        t0 = time.perf_counter()
        frame = self.inner.read(timeout)
        if frame is not None:
            slot = frame.index % self._KEEP
            self._index[slot], self._ms[slot] = frame.index, (time.perf_counter() - t0) * 1e3
            self.offered += 1
        return frame

    def read_ms(self, index: int) -> float:
        """Inner read time of frame `index` in ms (NaN when not kept)."""
        slot = index % self._KEEP
        return float(self._ms[slot]) if self._index[slot] == index else float("nan")


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_e2e(source: Source, predictor: Any, seconds: float, fps: float, warmup_s: float = 1.0,
            target: str = "A4C", progress: bool = False, config: Any = None) -> dict[str, Any]:
    """Run the engine threads on `source` (unpaced; paced here at `fps`) and measure.

    Args:
        source: an open or openable source that produces frames as fast as asked (sim realtime=False).
        predictor: the Predictor.
        seconds: measured length, after `warmup_s`.
        fps: pacing of the source.
        warmup_s: left out at the start.
        target: guidance target.
        progress: tqdm bar on stderr.
        config: EngineConfig (default: live settings, latency budget kept).

    Returns:
        The result dict (see the module docstring).
    """

    paced = PacedSource(source, fps)
    with source:
        engine = GuidanceEngine(paced, predictor, config or EngineConfig())
        engine.set_target(target)
        engine.start()
        try:
            time.sleep(warmup_s)
            skip_processed, offered0, dropped0 = engine.stats.processed, paced.offered, engine.latest().dropped_frames
            rss = [(0.0, rss_mb())]
            t0 = time.monotonic()
            bar = _bar(seconds) if progress else None
            while (elapsed := time.monotonic() - t0) < seconds and not engine.done:
                time.sleep(min(1.0, seconds - elapsed))
                rss.append((time.monotonic() - t0, rss_mb()))
                if bar is not None:
                    bar.n = min(seconds, round(time.monotonic() - t0, 1))
                    bar.refresh()
            if bar is not None:
                bar.close()
            elapsed = time.monotonic() - t0
            offered, dropped = paced.offered - offered0, engine.latest().dropped_frames - dropped0
            processed = engine.stats.processed - skip_processed
        finally:
            engine.stop()
    if engine.error is not None:
        raise engine.error
    return _result(engine, paced, skip_processed, offered, processed, dropped, elapsed, fps, rss)


def _result(engine, paced: PacedSource, skip: int, offered: int, processed: int, dropped: int, elapsed: float,
            fps: float, rss: list[tuple[float, float]]) -> dict[str, Any]:
    st = engine.stats

    def take(ring) -> np.ndarray:
        """The measured frames' values: processed numbers [skip, skip + processed) of the run."""
        values = ring.values()
        first = st.processed - len(values)          # run-wide number of values[0]
        return values[max(skip - first, 0):max(skip + processed - first, 0)]

    index = take(st.index).astype(np.int64)
    read = np.array([paced.read_ms(int(i)) for i in index])
    stages = {"read": read, "mailbox wait": take(st.wait_ms), "preprocess": take(st.preprocess_ms),
              "inference": take(st.inference_ms), "smoothing+gates": take(st.post_ms)}
    e2e = read + take(st.latency_ms)
    e2e = e2e[np.isfinite(e2e)]

    latency = timing_summary(e2e)
    total = latency["mean"] or float("nan")
    stage_out = {}
    for name, a in stages.items():
        s = timing_summary(a)
        s["share"] = round(s["mean"] / total, 4) if s["mean"] is not None and total > 0 else None
        stage_out[name] = s
    times = np.array([t for t, _ in rss])
    mem = np.array([m for _, m in rss])
    # Slope over the last 3/4 of the run: the clip ring buffer and timing arrays fill up first.
    late = times >= 0.25 * times[-1]
    slope = float(np.polyfit(times[late], mem[late], 1)[0] * 60) if late.sum() >= 3 else 0.0
    drop_fraction = dropped / offered if offered else 0.0
    offered_fps = offered / elapsed if elapsed > 0 else 0.0
    processed_fps = processed / elapsed if elapsed > 0 else 0.0
    state = engine.latest()
    return {
        "seconds": round(elapsed, 2), "fps_target": fps, "source": engine.source_name,
        "model": state.model_name, "precision": state.precision,
        "providers": list(getattr(getattr(engine.predictor, "bundle", None), "providers", []) or []),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "offered": offered, "processed": processed, "dropped": dropped, "drop_fraction": round(drop_fraction, 5),
        "offered_fps": round(offered_fps, 2), "processed_fps": round(processed_fps, 2),
        "source_keeps_up": offered_fps >= 0.97 * fps,
        "pipeline_keeps_up": drop_fraction <= 0.01 and processed_fps >= 0.97 * min(fps, offered_fps or fps),
        "latency_ms": latency, "engine_latency_ms": timing_summary(take(st.latency_ms)),
        "meets_target": bool(latency["p50"] is not None and latency["p50"] <= TARGET_P50_MS
                             and latency["p99"] <= TARGET_P99_MS),
        "stages_ms": stage_out, "states": dict(st.states),   # whole run, warm-up included
        "rss_mb": {"start": round(float(mem[0]), 1), "end": round(float(mem[-1]), 1),
                   "max": round(float(mem.max()), 1), "slope_mb_per_min": round(slope, 3)},
    }


def _bar(total: float):
    from tqdm import tqdm

    return tqdm(total=total, unit="s", desc="bench e2e", file=sys.stderr, leave=False,
                bar_format="{desc}: {n:.0f}/{total:.0f} s |{bar}| {elapsed}")


def format_table(r: dict[str, Any]) -> str:
    """The result as a short human-readable report."""
    lat = r["latency_ms"]
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    lines = [
        f"pocus bench e2e: {r['source']} at {r['fps_target']:.0f} fps for {r['seconds']:.0f} s, model {r['model']} "
        f"({r['precision']}, {', '.join(r['providers']) or 'n/a'}), {r['machine']['cores']} cores",
        f"frames offered {r['offered']} ({r['offered_fps']:.1f}/s), processed {r['processed']} "
        f"({r['processed_fps']:.1f}/s), dropped {r['dropped']} ({100 * r['drop_fraction']:.2f} %)",
        f"source keeps up: {yes(r['source_keeps_up'])}   pipeline keeps up: {yes(r['pipeline_keeps_up'])}",
        f"latency capture -> state: p50 {lat['p50']} ms, p99 {lat['p99']} ms "
        f"(target <= {TARGET_P50_MS:.0f} / <= {TARGET_P99_MS:.0f} ms: {'met' if r['meets_target'] else 'MISSED'})",
        "",
        f"{'stage':<18}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'share':>8}",
    ]
    for name, s in r["stages_ms"].items():
        fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
        share = f"{100 * s['share']:7.1f}%" if s["share"] is not None else f"{'-':>8}"
        lines.append(f"{name:<18}{fmt(s['p50'])}{fmt(s['p99'])}{fmt(s['mean'])}{share}")
    m = r["rss_mb"]
    lines += ["", f"RSS MB: start {m['start']}, end {m['end']}, max {m['max']} "
                  f"(slope {m['slope_mb_per_min']:+.2f} MB/min)"]
    return "\n".join(lines)
