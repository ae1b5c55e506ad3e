"""`pocus eval check`: many seeds of one policy, counted per view, compared episode by episode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_app.loop_check import format_paired, format_tally, mcnemar_p, paired, parse_seeds, tally

REPO = Path(__file__).resolve().parents[1]


def row(patient, target, outcome, seed=1, kind="near", best_achievable=False):
    return {"seed": seed, "patient": patient, "target": target, "kind": kind, "success": outcome == "success",
            "false_capture": outcome == "false_capture", "best_achievable": best_achievable, "outcome": outcome,
            "time_s": 10.0, "best_clip_quality": 0.9}


def test_seed_lists_take_ranges_and_reject_nonsense():
    assert parse_seeds("1-3,5") == [1, 2, 3, 5]
    assert parse_seeds("16-18, 2,2") == [2, 16, 17, 18]
    for bad in ("3-1", "x", "1-", "-2", ""):
        with pytest.raises(ValueError, match="seed"):
            parse_seeds(bad)


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)          # all 10 discordant episodes one way
    assert mcnemar_p(3, 7) == mcnemar_p(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert mcnemar_p(5, 5) == 1.0


def test_counts_and_paired_comparison_on_scripted_runs():
    before = [row(1, "PLAX", "success"), row(2, "PLAX", "not_captured"), row(3, "A4C", "false_capture"),
              row(4, "A4C", "success"), row(9, "A2C", "success")]
    now = [row(1, "PLAX", "success"), row(2, "PLAX", "success", best_achievable=True), row(3, "A4C", "never_near"),
           row(4, "A4C", "false_capture"), row(5, "A4C", "success")]
    counts = tally(now)
    assert list(counts) == ["PLAX", "A4C", "all"]
    assert counts["PLAX"] == {"episodes": 2, "successes": 2, "false_captures": 0, "best_achievable": 1, "never_near": 0,
                              "never_at_target": 0, "below_capture_level": 0, "not_captured": 0}
    assert counts["all"]["episodes"] == 5 and counts["all"]["successes"] == 3 and counts["all"]["false_captures"] == 1
    p = paired(now, before)
    assert p["shared_episodes"] == 4                    # patients 5 and 9 are in one run only
    assert p["success"] == {"this": 2, "before": 2, "only_this": 1, "only_before": 1, "p": 1.0}
    assert p["false_capture"]["only_this"] == 1 and p["false_capture"]["only_before"] == 1
    assert "| A4C | 3 | 1 (33%) | 1 (33.3%) | 0 | 1 | 0 | 0 | 0 |" in format_tally(counts)
    assert "only this run 1, only the run before 1" in format_paired(p)
    with pytest.raises(ValueError, match="share no episode"):
        paired(now, [row(7, "PLAX", "success", seed=2)])


def test_cli_runs_saves_and_compares_and_rejects_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "edge_app.cli", "eval", "check", "--bundle", "truth", "--seeds", "0", "--episodes", "2",
           "--views", "A4C", "--give-up", "6", "--workers", "1"]
    out = tmp_path / "a.json"
    r = subprocess.run(cmd + ["--out", str(out), "--json", "--patience-margin", "0.2"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    assert saved["settings"]["engine"]["patience_margin"] == 0.2       # the run says how the engine was set
    assert [e["kind"] for e in saved["episodes"]] == ["near", "far"] and saved["settings"]["novice"]["give_up_s"] == 6
    assert saved["counts"]["all"]["episodes"] == 2 and saved["environment"]["numpy"]
    r = subprocess.run(cmd + ["--against", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| A4C | 2 |" in r.stdout and "on 2 shared episodes" in r.stdout
    assert "only this run 0, only the run before 0 (exact McNemar p = 1)" in r.stdout   # deterministic episodes
    other = tmp_path / "other.json"                     # a run of other starts: no episode to pair with
    other.write_text(json.dumps({"episodes": [row(1, "PLAX", "success", seed=9)]}))
    kept = tmp_path / "kept.json"
    r = subprocess.run(cmd + ["--against", str(other), "--out", str(kept)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "share no episode" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(kept.read_text())["episodes"] == saved["episodes"]     # the run is saved all the same
    for bad, message in ((["--seeds", "5-2"], "bad seed range"), (["--against", str(tmp_path / "none.json")], "--against"),
                         (["--capture-margin", "PLAX=0.2"], "capture_margin per view"),
                         (["--capture-margin", "x"], "bad --capture-margin"), (["--views", "XYZ"], "unknown view"),
                         (["--patience-margin", "PSAX=0.1"], "patience_margin per view"),
                         (["--patience-margin", "1.5"], "patience_margin must be in [0, 1]")):
        r = subprocess.run(cmd + bad, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
