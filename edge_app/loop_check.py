"""`pocus eval check`: one policy of the closed loop over many held-out seeds, paired against a run
before.

`pocus eval guidance` runs all three policies on one seed and writes the report; telling two models
(or two engine settings) apart needs thousands of episodes, and the two runs must be compared
episode by episode: both see the same starts, so only the episodes where they disagree carry
information (an exact McNemar test on those). This command runs one policy (guided by default) on
the same deterministic starts as `pocus eval guidance --seed S` for every seed given, prints
successes and false captures per view, saves every episode to JSON, and with `--against` compares
with such a file.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from devices.labels import VIEWS
from edge_app.closed_loop import (OUTCOMES, POLICIES, Job, NoviceParams, add_engine_options, environment, make_starts,
                                  engine_overrides, run_jobs, target_views)

# The figures of the README: seeds 1-10 and 16-25 held out, 11-15 where engine settings were chosen.
DEFAULT_SEEDS = "1-10,16-25"
EPISODE_KEY = ("seed", "patient", "target", "kind")


def parse_seeds(text: str) -> list[int]:
    """"1-10,16-25" -> [1, ..., 10, 16, ..., 25] (sorted, no repeats)."""
    seeds: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad seed list '{text}': use numbers and ranges like 1-10,16-25") from None
        if a < 0 or b < a:
            raise ValueError(f"bad seed range '{part}': seeds are >= 0, ranges run low-high")
        seeds.update(range(a, b + 1))
    return sorted(seeds)


def run_check(seeds: Iterable[int], episodes: int = 20, views: Iterable[str] = VIEWS, policy: str = "guided",
              bundle: str | None = None, precision: str | None = "int8", engine_config: Any = None,
              novice: NoviceParams | None = None, workers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """Episodes of one policy on the starts of every seed; one row per episode (EPISODE_KEY and the
    result)."""
    from edge_app.engine import EngineConfig

    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    if episodes < 1:
        raise ValueError("episodes per view must be at least 1")
    names = target_views(views)
    novice = (novice or NoviceParams()).validate()
    engine_config = engine_config or EngineConfig()
    seeds = list(seeds)
    starts = [(seed, s) for seed in seeds for s in make_starts(names, episodes, seed)]
    jobs = [Job(s, policy, novice, 15.0, False, engine_config, False) for _, s in starts]
    results = run_jobs(jobs, bundle, precision, workers, progress)
    return [{"seed": seed, "patient": r.patient_seed, "target": r.target, "kind": r.kind, "success": r.success,
             "false_capture": r.false_capture, "best_achievable": r.best_achievable, "outcome": r.outcome,
             "time_s": round(r.time_s, 3),
             "best_clip_quality": round(r.best_clip_quality, 4)} for (seed, _), r in zip(starts, results)]


def tally(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per view and overall ("all"): episodes, successes, false captures and each outcome."""
    out: dict[str, dict[str, int]] = {}
    for key in [v for v in VIEWS if any(r["target"] == v for r in rows)] + ["all"]:
        rs = [r for r in rows if key in ("all", r["target"])]
        counts = Counter(r["outcome"] for r in rs)
        out[key] = {"episodes": len(rs), "successes": sum(bool(r["success"]) for r in rs),
                    "false_captures": sum(bool(r["false_capture"]) for r in rs),
                    "best_achievable": sum(bool(r.get("best_achievable")) for r in rs),
                    **{k: counts.get(k, 0) for k in OUTCOMES if k not in ("success", "false_capture")}}
    return out


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each discordant episode goes either way
    with probability 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def paired(rows: list[Mapping[str, Any]], before: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Episode-by-episode comparison on the episodes both runs share (same seed, patient, target,
    start kind): successes and false captures only one of them had, with McNemar p-values."""
    old = {tuple(r[k] for k in EPISODE_KEY): r for r in before}
    pairs = [(r, old[key]) for r in rows if (key := tuple(r[k] for k in EPISODE_KEY)) in old]
    if not pairs:
        raise ValueError("the two runs share no episode: compare runs of the same seeds, views and episodes per view")
    out: dict[str, Any] = {"shared_episodes": len(pairs)}
    for field in ("success", "false_capture"):
        a = sum(bool(r[field]) and not bool(o[field]) for r, o in pairs)
        b = sum(bool(o[field]) and not bool(r[field]) for r, o in pairs)
        out[field] = {"this": sum(bool(r[field]) for r, _ in pairs), "before": sum(bool(o[field]) for _, o in pairs),
                      "only_this": a, "only_before": b, "p": mcnemar_p(a, b)}
    return out


def format_tally(counts: Mapping[str, Mapping[str, int]]) -> str:
    cols = [k for k in OUTCOMES if k not in ("success", "false_capture")]
    lines = ["| view | episodes | successes | false captures | best achievable | "
             + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---" * (5 + len(cols)) + "|"]
    for view, c in counts.items():
        n = max(c["episodes"], 1)
        lines.append(f"| {view} | {c['episodes']} | {c['successes']} ({c['successes'] / n:.0%}) | "
                     f"{c['false_captures']} ({c['false_captures'] / n:.1%}) | {c['best_achievable']} | "
                     + " | ".join(str(c[k]) for k in cols) + " |")
    return "\n".join(lines)


def format_paired(p: Mapping[str, Any]) -> str:
    lines = [f"paired with the run before on {p['shared_episodes']} shared episodes:"]
    for field, name in (("success", "successes"), ("false_capture", "false captures")):
        f = p[field]
        lines.append(f"  {name}: {f['this']} against {f['before']}; only this run {f['only_this']}, only the run "
                     f"before {f['only_before']} (exact McNemar p = {f['p']:.3g})")
    return "\n".join(lines)


def configure_check(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the shipped bundle); 'truth': the "
                        "simulator's ground truth in place of a model")
    parser.add_argument("--precision", default="int8", choices=["int8", "fp32", "fp16"], help="model file to run")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS,
                        help=f"seeds of `pocus eval guidance --seed`, as a list of ranges (default {DEFAULT_SEEDS}: "
                             "the README's held-out sets, ~22 min on 2 cores)")
    parser.add_argument("--episodes", type=int, default=20,
                        help="episodes per target view and seed (half near, half far)")
    parser.add_argument("--views", nargs="+", default=list(VIEWS), help="target views")
    parser.add_argument("--policy", default="guided", choices=list(POLICIES), help="who moves the probe")
    add_engine_options(parser)
    parser.add_argument("--give-up", type=float, default=NoviceParams().give_up_s,
                        help="time limit per episode (simulated s)")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--out", default=None, help="JSON file for the episodes, the counts and the settings")
    parser.add_argument("--against", default=None,
                        help="a JSON file written by --out before: compare episode by episode")
    parser.add_argument("--json", action="store_true", help="print the counts (and comparison) as JSON")

    def run(args: argparse.Namespace) -> int:
        from edge_app.engine import EngineConfig

        before = None
        if args.against:
            try:
                before = json.loads(Path(args.against).read_text())["episodes"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--against {args.against}: not a file written by `pocus eval check --out` "
                                 f"({exc})") from None
        engine = EngineConfig(**engine_overrides(args))
        seeds = parse_seeds(args.seeds)
        novice = NoviceParams(give_up_s=args.give_up)
        rows = run_check(seeds, args.episodes, args.views, args.policy, args.bundle, args.precision, engine, novice,
                         workers=args.workers, progress=not args.json)
        counts = tally(rows)
        result: dict[str, Any] = {"counts": counts}
        settings = {"bundle": args.bundle, "precision": args.precision, "seeds": args.seeds, "episodes": args.episodes,
                    "views": args.views, "policy": args.policy, "novice": asdict(novice), "engine": asdict(engine)}

        def save() -> None:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "environment": environment(), **result, "episodes": rows},
                                      default=str))

        if args.out:
            save()                        # before the comparison: a mismatched --against loses no episode
        if before is not None:
            result["paired"] = paired(rows, before)
            if args.out:
                save()
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"{args.policy}, seeds {args.seeds}, {args.episodes} episodes per view and seed")
        print(format_tally(counts))
        if before is not None:
            print(format_paired(result["paired"]))
        return 0

    return run
