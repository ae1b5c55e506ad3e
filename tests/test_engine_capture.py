"""Auto-capture timing, clip files, best clip, protocol advance, manual capture and recording."""
import json
from pathlib import Path

import numpy as np
import pytest

from devices.base import Frame
from edge_app.engine import EngineConfig, GuidanceEngine
from edge_app.headless import summarize
from helpers_engine import FakeClock, FakeRecorder, ScriptedPredictor, make_output, us_image

FPS = 30.0
GOOD = make_output("A4C", 0.95, quality=0.9, action="HOLD")
POOR = make_output("A4C", 0.9, quality=0.3, action="SLIDE_LEFT")
CAPTURE_LEVEL = EngineConfig(quality_threshold=0.6).capture_level("A4C")   # diagnostic threshold plus the safety margin


def make_engine(recorder=None, **config):
    predictor = ScriptedPredictor(POOR)
    engine = GuidanceEngine(None, predictor, EngineConfig(**config), recorder=recorder, clock=FakeClock())
    return engine, predictor


def feed(engine, seconds, t0, start_index=0, size=64):
    out = []
    n = int(round(seconds * FPS))
    for i in range(n):
        t = t0 + i / FPS
        out.append(engine.process(Frame(image=us_image(t, size), t=t, index=start_index + i)))
    return out


def test_capture_fires_after_capture_hold_of_diagnostic_quality():
    engine, pred = make_engine(capture_hold_s=1.5)
    feed(engine, 1.0, 0.0)
    pred.output = GOOD
    states = feed(engine, 3.0, 1.0, 30)
    first_good = next(s.t for s in states if s.quality >= CAPTURE_LEVEL)
    capture = next(s for s in states if s.captures)
    assert capture.state == "CAPTURED"
    assert first_good + 1.5 - 1e-9 <= capture.t <= first_good + 1.5 + 1 / FPS + 1e-9
    cap = capture.captures[0]
    assert (cap.view, cap.auto, cap.path) == ("A4C", True, None)   # no folder: counted, not written
    assert cap.quality >= 0.6 and cap.t == capture.t
    # hold_progress climbs toward 1 while waiting
    waiting = [s.hold_progress for s in states if s.t < capture.t and s.quality >= CAPTURE_LEVEL]
    assert waiting == sorted(waiting) and 0 <= waiting[0] < 0.1 and waiting[-1] > 0.9


def test_a_dip_below_threshold_restarts_the_hold_timer():
    engine, pred = make_engine(capture_hold_s=1.5, smoothing_s=0.0)
    pred.output = GOOD
    feed(engine, 1.0, 0.0)
    pred.output = POOR
    feed(engine, 0.1, 1.0, 30)
    pred.output = GOOD
    states = feed(engine, 2.0, 1.1, 33)
    capture = next(s for s in states if s.captures)
    assert capture.t >= 1.1 + 1.5 - 1e-9


def test_no_second_capture_until_the_view_is_left_and_found_again():
    engine, pred = make_engine(capture_hold_s=0.5, captured_show_s=0.5, smoothing_s=0.0)
    pred.output = GOOD
    states = feed(engine, 4.0, 0.0)
    assert len(states[-1].captures) == 1
    assert states[-1].state == "HOLD"
    pred.output = POOR
    feed(engine, 0.5, 4.0, 120)
    pred.output = GOOD
    assert len(feed(engine, 1.0, 4.5, 135)[-1].captures) == 2


def test_capture_files_clip_thumbnail_and_best(tmp_path):
    engine, pred = make_engine(capture_hold_s=0.5, clip_s=1.0, captured_show_s=0.2, smoothing_s=0.0,
                               capture_folder=tmp_path, capture_margin=0.1)
    pred.output = make_output("A4C", 0.95, quality=0.8, action="HOLD")
    feed(engine, 1.0, 0.0)
    pred.output = POOR
    feed(engine, 0.5, 1.0, 30)
    pred.output = make_output("A4C", 0.95, quality=0.95, action="HOLD")
    s = feed(engine, 1.0, 1.5, 45)[-1]
    pred.output = POOR
    feed(engine, 0.5, 2.5, 75)
    pred.output = make_output("A4C", 0.95, quality=0.75, action="HOLD")
    s = feed(engine, 1.0, 3.0, 90)[-1]
    engine.flush()
    caps = s.captures
    assert [round(c.quality, 2) for c in caps] == [0.8, 0.95, 0.75]
    for c in caps:
        assert Path(c.path).is_file() and Path(c.path).with_suffix(".png").is_file()
    with np.load(caps[0].path) as z:
        assert z["frames"].shape[0] == 16                 # only 0.5 s had been seen
    with np.load(caps[1].path) as z:
        assert z["frames"].dtype == np.uint8 and z["frames"].shape[1:] == (64, 64)
        assert 30 <= z["frames"].shape[0] <= 31          # clip_s = 1 s at 30 fps
        assert np.all(np.diff(z["t"]) > 0) and z["t"][-1] == pytest.approx(caps[1].t)
        assert str(z["view"]) == "A4C" and json.loads(str(z["meta"]))["model"] == "scripted"
    best = np.load(tmp_path / "best_A4C.npz")
    second = np.load(caps[1].path)
    np.testing.assert_array_equal(best["frames"], second["frames"])   # 0.95 is the best, 0.7 did not replace it
    assert (tmp_path / "best_A4C.png").is_file()
    assert engine.best_captures["A4C"] == caps[1]


def test_protocol_advances_after_each_capture_and_completes():
    engine, pred = make_engine(capture_hold_s=0.3, captured_show_s=0.5, smoothing_s=0.0)
    engine.set_protocol("focused")
    assert engine.latest().protocol == ("PLAX", "PSAX", "A4C", "A2C", "SC4C")
    assert engine.latest().target == "PLAX"
    pred.output = make_output("PLAX", 0.95, quality=0.9, action="HOLD")  # every target "diagnostic"
    states = feed(engine, 6.0, 0.0)
    views = [c.view for c in states[-1].captures]
    assert views == ["PLAX", "PSAX", "A4C", "A2C", "SC4C"]
    assert states[-1].protocol_step == 5 and states[-1].target == "SC4C"
    captured = [s for s in states if s.state == "CAPTURED"]
    assert captured[0].instruction == "PLAX captured. Next: PSAX"
    assert any(s.instruction == "SC4C captured. Protocol complete" for s in captured)
    # The target changes only after the CAPTURED display time.
    first = next(s for s in states if s.captures)
    switched = next(s for s in states if s.target == "PSAX")
    assert switched.t - first.t == pytest.approx(0.5, abs=1 / FPS + 1e-9)


def test_set_target_inside_protocol_jumps_and_outside_ends_it():
    engine, _ = make_engine()
    engine.set_protocol(["A4C", "A2C", "SC4C"])
    engine.set_target("SC4C")
    assert (engine.latest().protocol_step, engine.latest().target) == (2, "SC4C")
    engine.set_target("PLAX")
    assert engine.latest().protocol == () and engine.latest().target == "PLAX"
    with pytest.raises(ValueError, match="unknown protocol"):
        engine.set_protocol("cardiac-arrest")
    with pytest.raises(ValueError, match="unknown target view"):
        engine.set_protocol(["A4C", "XYZ"])


def test_manual_capture(tmp_path):
    engine, _ = make_engine(capture_folder=tmp_path, clip_s=0.5)
    assert engine.capture_now() is None        # nothing seen yet
    feed(engine, 1.0, 0.0)
    cap = engine.capture_now()
    engine.flush()
    assert cap.auto is False and cap.view == "A4C" and Path(cap.path).is_file()
    assert engine.latest().state == "CAPTURED" and engine.latest().captures == (cap,)
    with np.load(cap.path) as z:
        assert 14 <= len(z["frames"]) <= 16


def test_recorder_gets_every_frame_with_outputs_and_instruction():
    rec = FakeRecorder()
    engine, pred = make_engine(recorder=rec)
    states = feed(engine, 0.5, 0.0)
    assert engine.latest().recording
    assert len(rec.items) == len(states) == 15
    frame, extra = rec.items[-1]
    assert frame.index == states[-1].frame_index
    assert extra["instruction"] == states[-1].instruction and extra["state"] == "GUIDING"
    assert extra["action"] == "SLIDE_LEFT" and extra["target"] == "A4C"
    assert len(extra["model"]["view_probs"]) == 6 and len(extra["model"]["quality"]) == 5
    assert extra["model"]["action"] == ["SLIDE_LEFT"] * 5
    json.dumps(extra)   # JSON-serialisable for frames.jsonl
    engine.stop_recording()
    assert rec.closed and not engine.latest().recording
    feed(engine, 0.2, 0.5, 15)
    assert len(rec.items) == 15


def test_blank_frames_are_recorded_without_model_outputs():
    rec = FakeRecorder()
    engine, _ = make_engine(recorder=rec)
    engine.process(Frame(image=np.zeros((64, 64), np.uint8), t=0.0, index=0))
    _, extra = rec.items[0]
    assert extra["state"] == "NO_SIGNAL" and "model" not in extra


def test_a_failing_recorder_stops_recording_not_guidance():
    class Broken(FakeRecorder):
        def append(self, frame, extra=None):
            raise OSError("No space left on device")

    engine, _ = make_engine(recorder=Broken())
    states = feed(engine, 0.3, 0.0)
    assert states[-1].available and not states[-1].recording
    assert "No space left" in engine.recording_error


def test_real_session_recorder_roundtrip(tmp_path):
    recorder = pytest.importorskip("devices.recorder", reason="devices/recorder.py not written yet")
    engine, _ = make_engine()
    engine.start_recording(tmp_path / "session")
    states = feed(engine, 0.5, 0.0)
    engine.stop_recording()
    replay = recorder.open_recording(tmp_path / "session")
    got = []
    with replay:
        for frame in replay:
            got.append(frame)
    assert len(got) == len(states)
    np.testing.assert_array_equal(got[-1].image, us_image(states[-1].t, 64))


def test_no_capture_between_the_threshold_and_the_capture_margin():
    """Quality just over the diagnostic line is within the model's error: hold, do not capture."""
    engine, pred = make_engine(capture_hold_s=0.5, smoothing_s=0.0, capture_margin=0.1)
    pred.output = make_output("A4C", 0.95, quality=0.65, action="HOLD")
    states = feed(engine, 3.0, 0.0)
    assert not states[-1].captures and all(s.hold_progress == 0 for s in states)
    pred.output = make_output("A4C", 0.95, quality=0.72, action="HOLD")
    states = feed(engine, 1.0, 3.0, 90)
    assert states[-1].captures and states[-1].captures[0].quality == pytest.approx(0.72)


def test_capture_margin_per_view_sets_each_targets_capture_level():
    """A per-view margin: the same quality captures for the view with the lower margin only."""
    margins = {"PLAX": 0.25, "PSAX": 0.1, "A4C": 0.3, "A2C": 0.25, "SC4C": 0.25}
    captured = {}
    for view in ("PSAX", "A4C"):
        engine, pred = make_engine(capture_hold_s=0.5, smoothing_s=0.0, capture_margin=margins)
        engine.set_target(view)
        pred.output = make_output(view, 0.95, quality=0.8, action="HOLD")
        states = feed(engine, 2.0, 0.0)
        assert states[-1].capture_level == pytest.approx(0.6 + margins[view])
        captured[view] = bool(states[-1].captures)
    assert captured == {"PSAX": True, "A4C": False}


def test_capture_margin_per_view_must_name_every_view():
    with pytest.raises(ValueError, match="exactly the views"):
        make_engine(capture_margin={"A4C": 0.2})
    with pytest.raises(ValueError, match=r"capture_margin must be in \[0, 1\]"):
        make_engine(capture_margin={"PLAX": 0.25, "PSAX": -0.1, "A4C": 0.3, "A2C": 0.25, "SC4C": 0.25})


STEADY = make_output("A4C", 0.95, quality=0.78, action="HOLD")   # over the patience level, under the capture level


def test_a_long_steady_hold_under_the_capture_level_captures_the_best_achievable_clip(tmp_path):
    """Over a poor window the capture level may be out of reach: after patience_s steady at the
    patience level the engine saves the best clip the window gives, and says so."""
    engine, pred = make_engine(smoothing_s=0.0, patience_s=6.0, patience_margin=0.15, capture_folder=tmp_path)
    assert 0.6 + 0.15 <= STEADY.quality[2] < CAPTURE_LEVEL
    pred.output = STEADY
    states = feed(engine, 5.9, 0.0)
    assert not states[-1].captures and states[-1].state == "HOLD"
    states = feed(engine, 0.5, 5.9, 177)
    capture = next(s for s in states if s.captures)
    assert 6.0 - 1e-9 <= capture.t <= 6.0 + 1 / FPS + 1e-9
    cap = capture.captures[0]
    assert cap.auto and cap.best_achievable and cap.quality == pytest.approx(0.78)
    assert capture.state == "CAPTURED" and capture.instruction == "A4C captured (the best this window gives)"
    engine.flush()
    with np.load(cap.path) as z:                          # the saved clip says how it was taken
        assert json.loads(str(z["meta"]))["best_achievable"] is True
    assert summarize(engine, 6.4, "seconds")["captures"][0]["best_achievable"] is True    # and the headless summary


def test_best_achievable_waits_again_after_a_dip_and_is_off_with_patience_none():
    engine, pred = make_engine(smoothing_s=0.0, patience_s=6.0)
    pred.output = STEADY
    feed(engine, 4.0, 0.0)
    pred.output = make_output("A4C", 0.95, quality=0.7, action="HOLD")      # under the patience level
    feed(engine, 0.2, 4.0, 120)
    pred.output = STEADY
    states = feed(engine, 6.5, 4.2, 126)
    assert next(s for s in states if s.captures).t >= 4.2 + 6.0 - 1e-9
    engine, pred = make_engine(smoothing_s=0.0, patience_s=None)
    pred.output = STEADY
    assert not feed(engine, 20.0, 0.0)[-1].captures
    with pytest.raises(ValueError, match="patience_s"):
        make_engine(patience_s=0.0)
    with pytest.raises(ValueError, match="patience_margin"):
        make_engine(patience_margin=1.5)


def test_patience_margin_per_view_sets_each_targets_patience_level():
    """A per-view patience margin: the same steady quality under the capture level gives a
    best-achievable clip for the view with the lower patience margin only."""
    margins = {"PLAX": 0.15, "PSAX": 0.1, "A4C": 0.2, "A2C": 0.15, "SC4C": 0.15}
    captured = {}
    for view in ("PSAX", "A4C"):
        engine, pred = make_engine(smoothing_s=0.0, patience_s=2.0, patience_margin=margins)
        engine.set_target(view)
        assert engine.config.patience_level(view) == pytest.approx(0.6 + margins[view])
        pred.output = make_output(view, 0.95, quality=0.75, action="HOLD")
        states = feed(engine, 4.0, 0.0)
        captured[view] = [c.best_achievable for c in states[-1].captures]
    assert captured == {"PSAX": [True], "A4C": []}
    with pytest.raises(ValueError, match="patience_margin per view needs exactly the views"):
        make_engine(patience_margin={"PSAX": 0.1})


def test_best_achievable_capture_needs_the_capture_check_at_its_own_level():
    """A steady rating that falls apart on shifted, zoomed ... copies of the frames is not saved."""
    fed = []

    def script(img, call):
        seen = any(img is f for f in fed[-60:])
        return make_output("A4C", 0.95, quality=0.78 if seen else 0.6, action="HOLD")

    engine, pred = make_engine(smoothing_s=0.0, patience_s=2.0, capture_check_slack=0.03)   # A4C ships without it
    pred.script = script
    for i in range(int(8 * FPS)):
        fed.append(us_image(i / FPS))
        state = engine.process(Frame(image=fed[-1], t=i / FPS, index=i))
        assert not state.captures
