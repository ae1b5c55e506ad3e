"""`pocus sim gallery` and `pocus sim bench`: look at the simulator and time it."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from devices.labels import ACTIONS, VIEW_LABELS, VIEWS


# ------------------------------------------------------------------------------------ gallery
def configure_gallery(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Arguments of `pocus sim gallery`; returns its runner."""
    parser.description = ("Render every standard view (PLAX, PSAX, A4C, A2C, SC4C) at its target pose for "
                          "several simulated patients, plus typical off-target frames, into one PNG grid. "
                          "Each tile is captioned with its ground truth: label view, quality for the "
                          "column's target and the best action toward it.")
    parser.add_argument("--out", default="docs/sim_gallery.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=3, help="number of patients, one row each (default: 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first patient (default: 0)")
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels (default: 256)")
    parser.add_argument("--off-target", type=int, default=2,
                        help="extra off-target tiles per row (near a target / anywhere on a window; default: 2)")
    parser.add_argument("--t", type=float, default=0.0, help="time in seconds (cardiac phase) of the frames")
    return run_gallery


def _caption(tile: np.ndarray, lines: list[str]) -> np.ndarray:
    bar = np.zeros((16 * len(lines) + 6, tile.shape[1]), np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(bar, text, (4, 14 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, 255, 1, cv2.LINE_AA)
    return np.vstack([tile, bar])


def gallery(patients: int = 3, size: int = 256, first_seed: int = 0, off_target: int = 2, t: float = 0.0,
            progress: bool = True) -> np.ndarray:
    """uint8 grid image: one row per patient, the five target views then off-target frames.

    Raises:
        ValueError: non-positive counts or a size out of range.
    """
    from devices.sim import ScanSettings, SimulatedProbe

    if patients < 1 or off_target < 0:
        raise ValueError(f"need --patients >= 1 and --off-target >= 0, got {patients} and {off_target}")
    settings = ScanSettings(size_px=size)
    rows = []
    seeds = range(first_seed, first_seed + patients)
    from tqdm import tqdm

    seeds = tqdm(seeds, desc="patients", disable=not progress)
    for seed in seeds:
        probe = SimulatedProbe(seed, settings=settings, realtime=False)
        rng = np.random.default_rng(seed)
        tiles = []
        items = [(v, probe.target_pose(v), "target") for v in VIEWS]
        for k in range(off_target):
            v = VIEWS[int(rng.integers(len(VIEWS)))]
            if k % 2 == 0:
                items.append((v, probe.sample_pose(rng, "near", view=v, spread=1.2), "near"))
            else:
                items.append((v, probe.sample_pose(rng, "window", view=v), "window"))
        for view, pose, kind in items:
            image, lab = probe.render(pose, t)
            vi = VIEWS.index(view)
            lines = [f"seed {seed} {kind} {view}",
                     f"label {VIEW_LABELS[lab['view']]} q={lab['quality'][vi]:.2f} ac={lab['acoustic']:.2f}",
                     f"-> {ACTIONS[int(lab['action'][vi])]}"]
            tiles.append(_caption(image, lines))
        rows.append(np.hstack([np.pad(t_, ((0, 0), (0, 4))) for t_ in tiles]))
    return np.vstack([np.pad(r, ((0, 4), (0, 0))) for r in rows])


def run_gallery(args: argparse.Namespace) -> int:
    grid = gallery(args.patients, args.size, args.first_seed, args.off_target, args.t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), grid):
        raise ValueError(f"could not write {out} (is the extension an image format such as .png?)")
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} px, {args.patients} patients)")
    return 0


# -------------------------------------------------------------------------------------- bench
def configure_bench(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Arguments of `pocus sim bench` / `pocus bench sim`; returns its runner."""
    parser.description = ("Simulator rendering speed on this machine, one thread: median wall-clock frames/s "
                          "over repeated renders of poses near the standard views (and frames/s from the mean "
                          "CPU time, steadier on a busy machine), at several output sizes, beside the floor "
                          "of a plain cv2.remap to the same size; plus the memory (RSS) one patient adds.")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128, 256],
                        help="output sizes in pixels (default: 64 128 256)")
    parser.add_argument("--frames", type=int, default=200, help="frames timed per size (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="patient seed (default: 0)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print the results as JSON (or write them to PATH)")
    return run_bench


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(sizes: list[int], frames: int = 200, seed: int = 0) -> dict:
    """Median render frames/s per output size, the cv2.remap floor, and memory per patient.

    Raises:
        ValueError: no sizes or fewer than 5 frames.
    """
    from devices.sim import ScanSettings, SimulatedProbe
    from devices.sim.render import speckle_field

    if not sizes or frames < 5:
        raise ValueError(f"need at least one --size and --frames >= 5, got {sizes} and {frames}")
    cv2.setNumThreads(1)
    rss0 = _rss_mb()
    speckle_field()
    rss_field = _rss_mb()
    results = []
    probe = None
    for size in sizes:
        probe = SimulatedProbe(seed, settings=ScanSettings(size_px=size), realtime=False)
        rng = np.random.default_rng(1)
        poses = [probe.sample_pose(rng, "near", view=VIEWS[i % len(VIEWS)], spread=0.7) for i in range(25)]
        for p in poses[:5]:
            probe.render(p, 0.0)
        times, cpu = [], []
        for i in range(frames):
            t0, c0 = time.perf_counter(), time.process_time()
            probe.render(poses[i % len(poses)], i / 30.0)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        r = probe._renderer
        polar = np.random.default_rng(0).integers(0, 255, (r.grid.n_lines, r.grid.n_samples), dtype=np.uint8)
        rt = []
        for _ in range(frames):
            t0 = time.perf_counter()
            cv2.remap(polar, r._maps[0], r._maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            rt.append(time.perf_counter() - t0)
        lt = []
        for i in range(min(frames, 100)):
            t0 = time.perf_counter()
            probe.labels(poses[i % len(poses)], i / 30.0)
            lt.append(time.perf_counter() - t0)
        results.append({
            "size_px": size, "lines": r.grid.n_lines, "samples": r.grid.n_samples,
            "render_fps": round(1.0 / float(np.median(times)), 1),
            "render_ms_p50": round(1e3 * float(np.median(times)), 3),
            "render_ms_p99": round(1e3 * float(np.percentile(times, 99)), 3),
            "render_fps_cpu_time": round(1.0 / max(float(np.mean(cpu)), 1e-9), 1),
            "remap_floor_fps": round(1.0 / float(np.median(rt)), 1),
            "labels_only_ms_p50": round(1e3 * float(np.median(lt)), 3),
        })
    rss1 = _rss_mb()
    extra = [SimulatedProbe(seed + 1 + i, settings=ScanSettings(size_px=max(sizes)), realtime=False) for i in range(3)]
    rss2 = _rss_mb()
    del extra, probe
    return {
        "threads": "cv2 1 thread, numpy single-threaded ops",
        "sizes": results,
        "speckle_field_mb_shared": round(rss_field - rss0, 1),
        "rss_mb_after_bench": round(rss1, 1),
        "rss_mb_per_extra_patient": round((rss2 - rss1) / 3.0, 2),
    }


def run_bench(args: argparse.Namespace) -> int:
    res = bench(args.size, args.frames, args.seed)
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}")
        return 0
    print(f"{'size':>6} {'lines x samples':>16} {'render fps':>11} {'p50 ms':>8} {'p99 ms':>8} {'fps (cpu)':>10} "
          f"{'remap floor fps':>16} {'labels ms':>10}")
    for r in res["sizes"]:
        print(f"{r['size_px']:>6} {str(r['lines']) + ' x ' + str(r['samples']):>16} {r['render_fps']:>11.0f} "
              f"{r['render_ms_p50']:>8.2f} {r['render_ms_p99']:>8.2f} {r['render_fps_cpu_time']:>10.0f} "
              f"{r['remap_floor_fps']:>16.0f} "
              f"{r['labels_only_ms_p50']:>10.2f}")
    print(f"memory: shared speckle field {res['speckle_field_mb_shared']} MB, "
          f"{res['rss_mb_per_extra_patient']} MB per extra patient, RSS {res['rss_mb_after_bench']} MB")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
