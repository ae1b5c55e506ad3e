"""`pocus bench model`: every format/precision of a bundle beside torch eager, in one table.

Accuracy on held-out simulated patients, latency at batch 1 with a pinned thread count, FPS, and the
share of this CPU's measured single-thread sgemm peak the model achieves.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Targets on a 2-core AVX2 CPU with one thread (issue 6).
TARGET_ORT_VS_TORCH = 3.0
TARGET_INT8_VS_FP32 = 1.5
TARGET_INT8_P50_MS = 1.5


def configure_bench_model(parser: argparse.ArgumentParser):
    """Add the `pocus bench model` arguments; return the command."""
    parser.description = (
        "Benchmark a bundle: every precision file on onnxruntime and the checkpoint in torch eager as the "
        "baseline. Accuracy on held-out simulated patients (view acc, best-action acc for every target view, "
        "quality MAE against the simulator's ground truth), latency p50/p99 at batch 1 with a pinned thread "
        "count, FPS, FLOPs and the achieved share of this CPU's measured sgemm peak.")
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the shipped edge_app/bundles/default)")
    parser.add_argument("--weights", default=None,
                        help="checkpoint for the torch eager baseline (default: the one recorded in the bundle)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    parser.add_argument("--profile", default="cpu",
                        help="device profile for the ONNX rows (default cpu; jetson-orin / desktop-cuda on a GPU)")
    parser.add_argument("--frames", type=int, default=300, help="held-out frames for the accuracy columns (default 300)")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per format (default 300)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--save", default=None, metavar="FILE", help="also write the JSON results to FILE")
    return run_bench_model


def run_bench_model(args: argparse.Namespace) -> int:
    """Run `pocus bench model`."""
    result = bench_model(args.bundle, args.weights, args.threads, args.frames, args.runs, args.profile,
                         progress=not args.json)
    text = json.dumps(result, indent=2)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text + "\n")
    print(text if args.json else format_table(result))
    return 0


def sgemm_peak_gflops(threads: int = 1, n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) with `threads` torch threads: best of `repeats`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n ** 3 / best / 1e9


def latency_rounds(runners: dict[str, Callable[[], Any]], runs: int, rounds: int = 3, warmup: int = 30) -> dict[str, np.ndarray]:
    """Latency samples (ms) of each runner, interleaved over `rounds` so background load hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in samples.items()}


def accuracy(out: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None) -> dict[str, float | None]:
    """View accuracy, best-action accuracy (every target view in turn) and quality MAE against ground truth."""
    if labels is None:
        return {"view_acc": None, "action_acc": None, "quality_mae": None}
    return {"view_acc": float(np.mean(out["view_logits"].argmax(-1) == labels["view"])),
            "action_acc": float(np.mean(out["action_logits"].argmax(-1) == labels["action"])),
            "quality_mae": float(np.mean(np.abs(out["quality"] - labels["quality"])))}


def _resolve_checkpoint(manifest: dict, weights: str | None) -> Path | None:
    from export.onnx_export import PACKAGE_ROOT

    if weights:
        return Path(weights)
    recorded = manifest.get("training", {}).get("checkpoint")
    if not recorded:
        return None
    for base in (PACKAGE_ROOT, Path.cwd()):
        if (base / recorded).is_file():
            return base / recorded
    return None


def bench_model(bundle_dir: str | None = None, weights: str | None = None, threads: int = 1, frames: int = 300,
                runs: int = 300, profile: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Benchmark every precision of a bundle and the torch eager baseline.

    Returns:
        {"cpu", "threads", "peak_gflops", "flops", "frames", "rows": [{format, precision, provider,
         status, size_mb, view_acc, action_acc, quality_mae, p50_ms, p99_ms, fps, speedup_vs_torch,
         gflops, peak_fraction, error}], "targets": {...}}
    """
    import torch

    from edge_app.bundle import DEFAULT_BUNDLE_DIR, PRECISIONS, load_bundle, read_bundle_json
    from export.heldout import EVAL_FIRST_PATIENT, sim_frames
    from export.onnx_export import ort_outputs, sha256_file, torch_outputs

    torch.set_num_threads(threads)
    bundle_dir = Path(bundle_dir) if bundle_dir else DEFAULT_BUNDLE_DIR
    info = read_bundle_json(bundle_dir)
    manifest = info["manifest"]
    size = int(manifest["input"]["shape"][-1])
    flops = int(manifest["model"].get("flops") or 0)
    try:
        x, labels = sim_frames(frames, EVAL_FIRST_PATIENT, size=size, seed=0, progress=progress)
        data_note = f"{frames} frames of simulated patients {EVAL_FIRST_PATIENT}+"
    except ValueError as e:
        x, labels = np.random.default_rng(0).standard_normal((min(frames, 32), 1, size, size)).astype(np.float32), None
        data_note = f"no accuracy: {e}"
    x1 = np.ascontiguousarray(x[:1])

    rows, runners = [], {}
    ckpt_path = _resolve_checkpoint(manifest, weights)
    row = {"format": "PyTorch", "precision": "fp32", "provider": "torch-eager", "file": str(ckpt_path)}
    try:
        if ckpt_path is None:
            raise ValueError("checkpoint recorded in the bundle not found: pass --weights")
        from export.onnx_export import load_weights
        model, _ = load_weights(ckpt_path)
        if weights is None and sha256_file(ckpt_path) != manifest["training"].get("checkpoint_sha256"):
            row["note"] = "checkpoint changed since export"
        row.update(size_mb=ckpt_path.stat().st_size / 1e6, **accuracy(torch_outputs(model, x), labels))
        xt = torch.from_numpy(x1)

        def run_torch(m=model, t=xt):
            with torch.inference_mode():
                m(t)
        runners["torch"] = run_torch
        row["status"] = "ok"
    except (ValueError, OSError, RuntimeError) as e:
        row.update(status="failed", error=str(e))
    rows.append(row)

    for name, entry in sorted(info["files"].items(), key=lambda kv: PRECISIONS.index(kv[1]["precision"])):
        precision = entry["precision"]
        row = {"format": "ONNX", "precision": precision, "provider": "?", "file": name,
               "size_mb": entry["size_bytes"] / 1e6}
        try:
            bundle = load_bundle(bundle_dir, profile=profile, precision=precision, threads=threads)
            row["provider"] = bundle.providers[0].replace("ExecutionProvider", "")
            row.update(accuracy(ort_outputs(bundle.session, x), labels))
            runners[precision] = lambda b=bundle: b.run(x1)
            row["status"] = "ok"
        except (ValueError, OSError, RuntimeError) as e:
            row.update(status="failed", error=str(e))
        rows.append(row)

    peak = sgemm_peak_gflops(threads)
    times = latency_rounds(runners, runs)
    peak = max(peak, sgemm_peak_gflops(threads))  # before and after: a busy machine lowers one of them
    by_key = dict(zip(["torch"] + [r["precision"] for r in rows[1:]], rows))
    for key, samples in times.items():
        r = by_key[key]
        p50 = float(np.median(samples))
        r.update(p50_ms=p50, p99_ms=float(np.percentile(samples, 99)), fps=1e3 / p50,
                 gflops=flops / p50 / 1e6 if flops else None,
                 peak_fraction=flops / p50 / 1e6 / peak if flops else None)
    torch_p50 = by_key["torch"].get("p50_ms")
    for r in rows:
        r["speedup_vs_torch"] = torch_p50 / r["p50_ms"] if torch_p50 and r.get("p50_ms") else None

    fp32, int8 = by_key.get("fp32", {}), by_key.get("int8", {})
    targets = {}
    if torch_p50 and fp32.get("p50_ms"):
        targets["ort_fp32_vs_torch"] = {"value": torch_p50 / fp32["p50_ms"], "target": TARGET_ORT_VS_TORCH}
    if fp32.get("p50_ms") and int8.get("p50_ms"):
        targets["int8_vs_fp32"] = {"value": fp32["p50_ms"] / int8["p50_ms"], "target": TARGET_INT8_VS_FP32}
        targets["int8_p50_ms"] = {"value": int8["p50_ms"], "target": TARGET_INT8_P50_MS}
    for k, t in targets.items():
        t["met"] = t["value"] <= t["target"] if k.endswith("_ms") else t["value"] >= t["target"]
    return {"bundle": str(bundle_dir), "model": f"{manifest['model']['name']} {manifest['model']['version']}",
            "cpu": _cpu_name(), "threads": threads, "batch": 1, "peak_gflops": peak, "flops": flops,
            "params": manifest["model"].get("params"), "data": data_note, "rows": rows, "targets": targets}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The benchmark as one table (Ultralytics style) plus the targets."""
    head = (f"{'Format':<8}{'Precision':<10}{'Provider':<12}{'Status':<8}{'Size (MB)':>10}{'view acc':>9}"
            f"{'action acc':>11}{'quality MAE':>12}{'p50 ms':>8}{'p99 ms':>8}{'FPS':>7}{'vs torch':>9}{'% peak':>7}")
    lines = [f"{result['model']}  |  {result['cpu']}  |  {result['threads']} thread(s), batch 1  |  "
             f"{result['flops'] / 1e6:.0f} MFLOPs, {result.get('params') or 0:,} params  |  sgemm peak "
             f"{result['peak_gflops']:.1f} GFLOP/s", f"accuracy: {result['data']}", head]
    for r in result["rows"]:
        status = "✅" if r.get("status") == "ok" else "❌"
        lines.append(f"{r['format']:<8}{r['precision']:<10}{r['provider']:<12}{status:<8}{_fmt(r.get('size_mb'), '.2f'):>10}"
                     f"{_fmt(r.get('view_acc'), '.3f'):>9}{_fmt(r.get('action_acc'), '.3f'):>11}"
                     f"{_fmt(r.get('quality_mae'), '.4f'):>12}{_fmt(r.get('p50_ms'), '.3f'):>8}"
                     f"{_fmt(r.get('p99_ms'), '.3f'):>8}{_fmt(r.get('fps'), '.0f'):>7}"
                     f"{_fmt(r.get('speedup_vs_torch'), '.2f'):>9}{_fmt(r.get('peak_fraction') and 100 * r['peak_fraction'], '.0f'):>7}")
        if r.get("error"):
            lines.append(f"    {r['error']}")
        if r.get("note"):
            lines.append(f"    note: {r['note']}")
    for name, t in result["targets"].items():
        op = "<=" if name.endswith("_ms") else ">="
        lines.append(f"target {name}: {t['value']:.2f} ({op} {t['target']}) {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
