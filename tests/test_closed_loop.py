"""Closed-loop evaluation: the simulated novice, episodes through the real engine, metrics, report."""
import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from devices.labels import ACTIONS, HOLD, HOLD_RADIUS, POSE_SCALE, VIEW_RADIUS, VIEWS, move_size
from edge_app.closed_loop import (EpisodeResult, Novice, NoviceParams, TruthPredictor, add_engine_options,
                                  engine_overrides, episode_outcome, headline_table, make_starts, run_episode,
                                  summarize, wilson_interval, write_report)
from edge_app.engine import EngineConfig
from helpers_engine import make_output

REPO = Path(__file__).resolve().parents[1]
FAST = NoviceParams(give_up_s=20.0)


class AlwaysHold:
    """A model that always says 'hold still' and sees no view: must never lead to a capture."""

    name, precision = "always-hold", "fp32"

    def predict(self, image):
        return make_output("OTHER", 0.9, quality=0.02, action="HOLD", action_conf=0.9)


def test_starts_are_deterministic_and_on_held_out_patients():
    a, b = make_starts(["A4C", "PLAX"], 4, seed=3), make_starts(["A4C", "PLAX"], 4, seed=3)
    assert a == b
    assert all(s.patient_seed >= 30000 for s in a)          # training / val / test use seeds < 30000
    assert [s.kind for s in a[:4]] == ["near", "near", "far", "far"]
    assert make_starts(["A4C"], 2, seed=4) != make_starts(["A4C"], 2, seed=3)


def test_a_run_on_some_views_draws_the_starts_of_the_all_view_run():
    every = make_starts(list(VIEWS), 3, seed=2)
    some = make_starts(["SC4C", "PSAX"], 3, seed=2)
    assert some == [s for s in every if s.target == "SC4C"] + [s for s in every if s.target == "PSAX"]
    assert len({s.patient_seed for s in every}) == len(every)
    with pytest.raises(ValueError, match="episodes per view"):
        make_starts(["PSAX"], 1000 // len(VIEWS) + 1, seed=0)


def test_episode_is_deterministic_for_a_fixed_seed():
    start = make_starts(["A4C"], 2, seed=0)[0]
    r1 = run_episode(start, "guided", TruthPredictor(), replace(FAST, give_up_s=8.0))
    r2 = run_episode(start, "guided", TruthPredictor(), replace(FAST, give_up_s=8.0))
    assert r1 == r2


def test_truth_predictor_answers_with_the_labels_of_the_frame_it_is_given():
    from devices.base import Frame
    from devices.sim import SimulatedProbe

    probe = SimulatedProbe(patient_seed=30001, realtime=False)
    truth = TruthPredictor()
    with pytest.raises(RuntimeError, match="no labelled frame"):
        truth.predict(np.zeros((8, 8), np.uint8))
    frames = []
    for i, view in enumerate(("A4C", "PLAX")):
        image, labels = probe.render(probe.target_pose(view), 0.1 * i)
        frames.append(Frame(image=image, t=0.1 * i, index=i, labels=labels))
        truth.remember(frames[-1])
    for frame in frames:                      # looked up by image, not "the newest frame"
        out = truth.predict(frame.image)
        assert np.argmax(out.view_probs) == frame.labels["view"]
        np.testing.assert_allclose(out.quality, frame.labels["quality"], rtol=1e-6)
        np.testing.assert_allclose(out.pose_offset, frame.labels["pose_offset"] / POSE_SCALE, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        truth.remember(Frame(image=frames[0].image, t=1.0, index=2, labels=None))


@pytest.mark.parametrize("view", ["A4C", "PLAX", "SC4C"])
def test_oracle_reaches_the_target_from_near_starts(view):
    novice = NoviceParams()  # the evaluation's 60 s: truth just above the capture level, tremor restarts holds
    for start in [s for s in make_starts([view], 4, seed=0) if s.kind == "near"]:
        r = run_episode(start, "oracle", TruthPredictor(), novice)
        assert r.success and r.captured and not r.false_capture, (view, start.patient_seed, r)
        assert r.capture_quality >= 0.6 and r.time_s < novice.give_up_s
        # the clip it saved is one of the clips on its path, so the best clip is at least as good
        assert r.outcome == "success" and r.closest < VIEW_RADIUS and r.best_clip_quality >= r.capture_quality


def test_a_model_that_always_says_hold_never_succeeds_from_far_starts():
    for start in [s for s in make_starts(["A4C", "PSAX"], 2, seed=1) if s.kind == "far"]:
        r = run_episode(start, "guided", AlwaysHold(), replace(FAST, give_up_s=10.0))
        assert not r.success and not r.captured and r.time_s == 10.0
        assert r.outcome == "never_near" and r.closest > VIEW_RADIUS and r.best_clip_quality < 0.6


def test_episode_outcome_says_where_a_failure_came_from():
    level = 0.85
    assert episode_outcome(True, True, 0.2, 0.9, level) == "success"
    assert episode_outcome(False, True, 0.2, 0.9, level) == "false_capture"
    assert episode_outcome(False, False, VIEW_RADIUS + 0.1, 0.84, level) == "never_near"
    assert episode_outcome(False, False, VIEW_RADIUS, 0.84, level) == "never_at_target"
    assert episode_outcome(False, False, HOLD_RADIUS, 0.84, level) == "below_capture_level"
    assert episode_outcome(False, False, 0.1, 0.85, level) == "not_captured"


class Lost:
    """A model that recognises nothing and knows no way: the app stays SEARCHING with its hint."""

    name, precision = "lost", "fp32"

    def predict(self, image):
        return make_output("OTHER", 0.9, quality=0.0, action="SLIDE_HEAD", action_conf=0.1, distance=5.0)


def test_a_novice_lost_without_instructions_starts_again_on_the_window():
    from devices.sim import SimulatedProbe

    start = next(s for s in make_starts(["A4C"], 2, seed=0) if s.kind == "far")
    target = np.asarray(SimulatedProbe(patient_seed=start.patient_seed, realtime=False).target_pose("A4C"))
    away = replace(start, pose=tuple(np.asarray(start.pose) + [80.0, 0.0, 0.0, 0.0, 0.0]))   # 8 cm off
    on_window = lambda p: abs(p[1] - target[0]) <= 25.0 and abs(p[2] - target[1]) <= 25.0  # noqa: E731
    # 8 cm off the window the frames are dark: without this the engine would show the pose head's
    # window-first move (EngineConfig.blind_dark_fraction) and the novice would follow it, not be lost.
    no_window_first = EngineConfig(blind_dark_fraction=None)
    for policy in ("guided", "unguided"):
        r = run_episode(away, policy, Lost(), replace(FAST, restart_after_s=3.0, give_up_s=6.0),
                        engine_config=no_window_first, keep_trajectory=True)
        lifts = [p[0] for p in r.trajectory if p[1] is None]          # the probe was lifted here
        assert lifts and 3.0 <= lifts[0] < 3.5, policy
        placed = [p for p in r.trajectory if p[1] is not None]
        before, after = [p for p in placed if p[0] < lifts[0]], [p for p in placed if p[0] > lifts[0]]
        assert before and not any(on_window(p) for p in before), policy
        assert after and all(on_window(p) for p in after), policy
    stay = run_episode(away, "guided", Lost(), replace(FAST, restart_after_s=0.0, give_up_s=6.0),
                       engine_config=no_window_first, keep_trajectory=True)
    assert not any(on_window(p) for p in stay.trajectory)


def test_novice_follows_with_delay_and_holds_still_on_hold():
    params = NoviceParams(reaction_s=0.4, move_s=0.5, step_mean=0.6, step_cv=0.0, wrong_way_p=0.0, tremor=0.0)
    hand = Novice(params, np.random.default_rng(0))
    dt = 1 / 15
    moves = [hand.step(i * dt, dt, ACTIONS.index("SLIDE_HEAD")) for i in range(30)]
    start = next(i for i, m in enumerate(moves) if np.any(m))
    assert 0.4 <= start * dt <= 0.4 + dt + 1e-9             # reacts after the human delay
    first = np.sum(moves[start:start + 8], axis=0)
    assert first[0] == pytest.approx(0.6 * POSE_SCALE[0]) and np.allclose(first[1:], 0)
    hand = Novice(params, np.random.default_rng(0))
    assert not any(np.any(hand.step(i * dt, dt, HOLD)) for i in range(60))


def test_novice_wrong_way_and_tremor():
    params = NoviceParams(reaction_s=0.0, step_cv=0.0, wrong_way_p=1.0, tremor=0.05)
    hand = Novice(params, np.random.default_rng(0))
    total = np.sum([hand.step(i / 15, 1 / 15, ACTIONS.index("ROTATE_CW")) for i in range(10)], axis=0)
    assert total[2] < 0                                      # always the opposite way
    jitter = np.array([hand.tremor(1 / 15) for _ in range(3000)]) / POSE_SCALE
    assert 0.03 < jitter.std() < 0.07
    with pytest.raises(ValueError, match="wrong_way_p"):
        NoviceParams(wrong_way_p=1.5).validate()


def test_novice_step_follows_the_move_size_caption_only_when_asked():
    base = dict(reaction_s=0.0, step_mean=0.6, step_cv=0.0, wrong_way_p=0.0, tremor=0.0)

    def one_move(params, size):
        hand = Novice(params, np.random.default_rng(0))
        return np.sum([hand.step(i / 15, 1 / 15, ACTIONS.index("SLIDE_HEAD"), size) for i in range(9)], axis=0)[0]

    ignores = NoviceParams(**base)
    assert [one_move(ignores, size) for size in range(3)] == pytest.approx([0.6 * POSE_SCALE[0]] * 3)
    follows = NoviceParams(**base, size_steps=(0.5, 1.0, 1.6))
    assert [one_move(follows, size) for size in range(3)] == pytest.approx([0.3 * POSE_SCALE[0], 0.6 * POSE_SCALE[0],
                                                                         0.96 * POSE_SCALE[0]])
    assert [move_size(m) for m in (0.2, 0.75, 1.2, 1.5, 4.0)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="size_steps"):
        NoviceParams(size_steps=(1.0, 1.0)).validate()


def _result(policy, target, kind, success, captured, t, path=1.0, unavailable=0.0, closest=0.5, best_clip=0.7,
            best_achievable=False):
    return EpisodeResult(policy, target, kind, 30000, success, captured, captured and not success, t, path,
                         unavailable, 0.7 if success else (0.4 if captured else None), closest=closest,
                         best_clip_quality=best_clip,
                         outcome=episode_outcome(success, captured, closest, best_clip, capture_level=0.85),
                         best_achievable=best_achievable)


SCRIPTED = [
    _result("guided", "A4C", "near", True, True, 4.0, 2.0, 0.1),
    _result("guided", "A4C", "far", True, True, 10.0, 6.0, 0.0, best_achievable=True),
    _result("guided", "PLAX", "near", False, True, 3.0, 1.0, 0.2, best_achievable=True),   # false capture
    _result("guided", "PLAX", "far", False, False, 60.0, 9.0, 0.3, closest=3.0),  # gave up far away
    _result("oracle", "A4C", "near", True, True, 2.0),
    _result("oracle", "PLAX", "far", True, True, 6.0),
]


def test_summary_metrics_on_scripted_episodes():
    s = summarize(SCRIPTED, give_up_s=60.0)
    g = s["policies"]["guided"]["overall"]
    assert g["episodes"] == 4 and g["success_rate"] == 0.5 and g["false_capture_rate"] == 0.25
    assert g["time_to_success_median_s"] == 7.0
    assert g["time_to_success_p90_s"] == pytest.approx(4.0 + 0.9 * 6.0)
    assert g["path_length_median"] == 4.0 and g["unavailable_fraction"] == pytest.approx(0.15)
    assert s["policies"]["guided"]["by_view"]["PLAX"]["success_rate"] == 0.0
    assert s["policies"]["guided"]["by_start"]["far"]["success_rate"] == 0.5
    assert s["policies"]["oracle"]["overall"]["success_rate"] == 1.0
    assert g["outcomes"] == {"success": 2, "false_capture": 1, "never_near": 1, "never_at_target": 0,
                             "below_capture_level": 0, "not_captured": 0}
    assert g["best_clip_quality_median_uncaptured"] == 0.7      # the one episode that gave up
    assert g["best_achievable_captures"] == 2 and g["best_achievable_false"] == 1
    table = headline_table(s)
    assert "| guided | 50% (15%-85%) | 7.0 |" in table and "25.0%" in table
    assert wilson_interval(0.5, 50) == pytest.approx((0.366, 0.634), abs=0.001)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0


def test_report_renders(tmp_path):
    s = summarize(SCRIPTED, give_up_s=60.0)
    s["sweep_wrong_way"] = [{"wrong_way_p": 0.2, **s["policies"]["guided"]["overall"]}]
    s["config"] = {"episodes": 2, "precision": "int8"}
    s["wall_s"] = 1.0
    s["environment"] = {"numpy": "1.0", "onnxruntime": "9.9"}
    SCRIPTED[0].trajectory = [[0.0, 10.0, 5.0], [1.0, 12.0, 6.0]]
    report = write_report(tmp_path / "eval", s, SCRIPTED)
    text = report.read_text()
    assert "| guided | 50% (15%-85%) |" in text and "| 0.20 | 50% |" in text
    assert "Environment: numpy 1.0, onnxruntime 9.9 (" in text
    assert "| guided | 1 | 1 | 0 | 0 | 0 | 0.70 |" in text and "| guided PLAX | 1 | 1 | 0 | 0 | 0 | 0.70 |" in text
    assert "| oracle | 0 | 0 | 0 | 0 | 0 | - |" in text
    assert "- guided: 2 best-achievable captures (a long steady hold under the capture level), 1 of them" in text
    for png in ("success_vs_time.png", "success_by_view.png", "trajectories.png"):
        data = (tmp_path / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in text
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["policies"]["guided"]
    assert len((tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()) == len(SCRIPTED)


@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--capture-check-slack", "off"], {"capture_check_slack": None}),
    (["--capture-check-slack", "0.05"], {"capture_check_slack": 0.05}),
    (["--capture-check-slack", "plax=OFF,PSAX=0.03,A4C=off,A2C=0.03,SC4C=0.03", "--capture-margin", "0.2"],
     {"capture_check_slack": {"PLAX": None, "PSAX": 0.03, "A4C": None, "A2C": 0.03, "SC4C": 0.03},
      "capture_margin": 0.2}),
])
def test_engine_options_become_engine_settings(argv, expected):
    """One value or one per view; 'off' turns the capture check off (every view, or one)."""
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    overrides = engine_overrides(parser.parse_args(argv))
    assert overrides == expected
    resolved = EngineConfig(**overrides).resolved()
    slack = expected.get("capture_check_slack", EngineConfig().capture_check_slack)
    assert {v: resolved.check_slack(v) for v in VIEWS} == (slack if isinstance(slack, dict) else dict.fromkeys(VIEWS, slack))
    with pytest.raises(ValueError, match="bad --capture-margin 'PLAX=off"):
        engine_overrides(parser.parse_args(["--capture-margin", "PLAX=off"]))


def test_cli_runs_end_to_end_and_rejects_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "edge_app.cli", "eval", "guidance"]
    margins = "PLAX=0.2,PSAX=0.2,A4C=0.3,A2C=0.2,SC4C=0.2"       # the same forms as `pocus eval check`
    r = subprocess.run(cmd + ["--bundle", "truth", "--episodes", "1", "--views", "A4C", "--sweep", "--give-up", "4",
                              "--workers", "1", "--json", "--out", str(tmp_path / "r"), "--capture-margin", margins,
                              "--patience-margin", "0.1", "--blind-dark-fraction", "off",
                              "--capture-check-slack", "PLAX=off,PSAX=0.05,A4C=off,A2C=0,SC4C=0.03",
                              "--min-action-confidence", "0.25",
                              "--reversal-block", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["policies"]) == {"guided", "oracle", "unguided"}
    engine = summary["config"]["engine"]
    assert engine["capture_margin"]["A4C"] == 0.3 and engine["patience_margin"] == 0.1
    assert engine["blind_dark_fraction"] is None
    assert engine["capture_check_slack"] == {"PLAX": None, "PSAX": 0.05, "A4C": None, "A2C": 0, "SC4C": 0.03}
    assert engine["min_action_confidence"] == 0.25 and engine["reversal_block_s"] == 0
    assert summary["environment"]["onnxruntime"] and summary["environment"]["numpy"] == np.__version__
    assert (tmp_path / "r" / "report.md").is_file()
    for bad, message in ((["--views", "XYZ"], "unknown view 'XYZ'"),
                         (["--capture-margin", "A4C=0.2"], "capture_margin per view"),
                         (["--patience-margin", "x"], "bad --patience-margin"),
                         (["--blind-dark-fraction", "2"], "blind_dark_fraction must be in (0, 1]"),
                         (["--blind-dark-fraction", "dark"], "bad --blind-dark-fraction"),
                         (["--capture-check-slack", "1.5"], "capture_check_slack must be in [0, 1]"),
                         (["--capture-check-slack", "loose"], "bad --capture-check-slack"),
                         (["--capture-check-slack", "PLAX=off"], "capture_check_slack per view"),
                         (["--min-action-confidence", "1.2"], "min_action_confidence must be in [0, 1]"),
                         (["--reversal-block", "-1"], "reversal_block_s must be >= 0")):
        r = subprocess.run(cmd + bad, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    poses = [sys.executable, "-m", "edge_app.cli", "eval", "poses", "--out", str(tmp_path / "p.npz")]
    r = subprocess.run(poses + ["--seed", "12"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--seed must be 0-9" in r.stderr and "Traceback" not in r.stderr


def test_collect_poses_saves_visited_offsets_from_training_patients(tmp_path):
    """`pocus eval poses`: guided episodes on training patients (seeds < 10000), poses shown relative
    to the target every 0.2 s, tremor included; the first one is the start's offset."""
    from devices.sim import SimulatedProbe
    from edge_app.closed_loop import POSES_EVERY_S, TRAIN_SEED_BASE, collect_poses

    info = collect_poses(tmp_path / "p.npz", episodes_per_view=1, bundle="truth", workers=1, progress=False,
                         novice=NoviceParams(give_up_s=2.0))
    with np.load(tmp_path / "p.npz") as z:
        view, offset, patient = z["view"], z["offset"], z["patient_seed"]
    assert info["episodes"] == 5 and info["poses"] == len(view) == len(offset) == len(patient)
    assert sorted(set(view.tolist())) == [0, 1, 2, 3, 4] and offset.shape[1] == 5
    assert 0 <= patient.min() and patient.max() < TRAIN_SEED_BASE + 10_000      # training split only
    assert len(view) <= 5 * (int(2.0 / POSES_EVERY_S) + 1)
    start = make_starts(["PLAX"], 1, seed=0, first_patient=TRAIN_SEED_BASE)[0]
    first = offset[(patient == start.patient_seed)][0]
    true = np.asarray(start.pose) - SimulatedProbe(patient_seed=start.patient_seed, realtime=False).target_pose("PLAX")
    assert np.all(np.abs(first - true) / POSE_SCALE < 0.5)       # the start, up to the hand's tremor
    with pytest.raises(ValueError, match="at least 1"):
        collect_poses(tmp_path / "q.npz", episodes_per_view=0)
