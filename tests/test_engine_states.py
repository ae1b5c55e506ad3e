"""State machine and safety gates of the guidance engine, on simulated time with scripted outputs."""
from dataclasses import replace

import numpy as np
import pytest

from devices.base import Frame
from devices.labels import ACTION_TEXT, ACTIONS, VIEWS
from edge_app.engine import (NO_HEART_IN_VIEW, EngineConfig, GuidanceEngine, GuidanceState, ModelOutput,
                             window_first_probs)
from helpers_engine import (FakeClock, ScriptedPredictor, checkerboard_image, lung_image, make_output,
                            noise_image, texture_image, us_image)

FPS = 30.0


def make_engine(output=None, delay_s=0.0, **config):
    clock = FakeClock()
    predictor = ScriptedPredictor(output or make_output(), clock=clock, delay_s=delay_s)
    engine = GuidanceEngine(None, predictor, EngineConfig(**config), clock=clock)
    return engine, predictor


class Feeder:
    """Feeds frames on simulated time, continuing from where the last call stopped."""

    def __init__(self, engine, fps=FPS):
        self.engine, self.fps, self.t, self.i = engine, fps, 0.0, 0

    def run(self, seconds, image=us_image, output=None, predictor=None):
        states = []
        for _ in range(int(round(seconds * self.fps))):
            if output is not None:
                predictor.output = output
            img = image(self.t) if callable(image) else image
            states.append(self.engine.process(Frame(image=img, t=self.t, index=self.i)))
            self.t += 1 / self.fps
            self.i += 1
        return states


def test_initial_state_is_no_signal_waiting():
    engine, _ = make_engine()
    s = engine.latest()
    assert isinstance(s, GuidanceState)
    assert s.state == "NO_SIGNAL" and not s.available and s.action is None
    assert s.instruction == "Guidance unavailable: waiting for the first frame"
    assert s.target == "A4C" and s.model_name == "scripted"


def test_full_walk_through_every_state():
    engine, pred = make_engine(capture_hold_s=1.0, captured_show_s=1.0)
    engine.set_protocol(["A4C", "A2C"])
    feed = Feeder(engine)
    # No standard view, far from the target: SEARCHING with a where-to-start hint.
    s = feed.run(1.0, output=make_output("OTHER", 0.9, quality=0.05, action="SLIDE_LEFT", distance=4.0,
                                         action_conf=0.3), predictor=pred)[-1]
    assert (s.state, s.available, s.action) == ("SEARCHING", True, None)
    assert s.instruction.startswith("Looking for A4C: place the probe on the apex")
    # The view appears: GUIDING with one instruction.
    s = feed.run(1.0, output=make_output("A4C", 0.9, quality=0.3, action="ROTATE_CW"), predictor=pred)[-1]
    assert (s.state, s.action, s.instruction) == ("GUIDING", "ROTATE_CW", ACTION_TEXT["ROTATE_CW"])
    assert s.magnitude == pytest.approx(1.5, abs=0.02)
    # Diagnostic quality: HOLD, and after capture_hold_s: CAPTURED, then the next protocol view.
    states = feed.run(3.0, output=make_output("A4C", 0.95, quality=0.95, action="HOLD"), predictor=pred)
    names = [x.state for x in states]
    assert "HOLD" in names and "CAPTURED" in names
    assert names.index("HOLD") < names.index("CAPTURED")
    assert [c.view for c in states[-1].captures] == ["A4C"]
    after = [x for x in states if x.state != "CAPTURED" and x.t > states[names.index("CAPTURED")].t]
    assert after and after[-1].target == "A2C" and after[-1].protocol_step == 1


def test_other_view_near_the_target_still_guides():
    engine, pred = make_engine()
    s = Feeder(engine).run(0.5, output=make_output("OTHER", 0.9, quality=0.2, action="TILT_AWAY", distance=1.0),
                           predictor=pred)[-1]
    assert s.state == "GUIDING" and s.action == "TILT_AWAY"


def test_stale_source_gives_no_signal_then_recovers():
    engine, pred = make_engine(stale_timeout_s=0.5)
    feed = Feeder(engine)
    s = feed.run(1.0)[-1]
    assert s.available
    assert engine.tick(now=s.t + 0.3).available                     # within the timeout
    stale = engine.tick(now=s.t + 1.2)
    assert stale.state == "NO_SIGNAL" and stale.reasons == ("no new frame for 1.2 s",)
    assert stale.instruction == "Guidance unavailable: no new frame for 1.2 s" and stale.action is None
    assert stale.fps == 0.0 and stale.quality == 0.0
    feed.t = s.t + 1.5
    assert feed.run(0.1)[-1].available


def test_frozen_image_after_one_second():
    engine, _ = make_engine(frozen_s=1.0)
    still = us_image(0.0)
    states = Feeder(engine).run(1.5, image=still)
    by_t = {round(s.t, 3): s for s in states}
    assert all(s.available for s in states if s.t <= 0.99)
    late = [s for s in states if s.t > 1.05]
    assert late and all(s.state == "NO_SIGNAL" and "frozen image" in s.reasons for s in late)
    assert by_t[0.0].available


def test_near_identical_frames_count_as_frozen():
    engine, _ = make_engine(frozen_s=0.5)
    base = us_image(0.0).astype(np.int16)
    rng = np.random.default_rng(1)
    # Capture-card noise on a paused screen: a few pixels off by one grey level.
    jitter = lambda t: np.clip(base + (rng.random(base.shape) < 0.05), 0, 255).astype(np.uint8)  # noqa: E731
    assert "frozen image" in Feeder(engine).run(1.0, image=jitter)[-1].reasons


def test_a_still_probe_over_lung_is_not_a_frozen_image():
    # Near-black frame, only the skin line bright (as the simulator draws a probe over lung): the
    # model must still be asked, so the app can say where the heart is instead of "frozen image".
    engine, pred = make_engine(frozen_s=0.5)
    dark = np.zeros((96, 96), np.uint8)
    dark[:6, 33:63] = 120                       # 2 % of the frame
    states = Feeder(engine).run(1.5, image=lambda t: dark.copy())
    assert all("frozen image" not in s.reasons for s in states)
    assert pred.calls == len(states)
    # the same frame with tissue in it does freeze
    assert "frozen image" in Feeder(make_engine(frozen_s=0.5)[0]).run(1.5, image=lambda t: us_image(0.0))[-1].reasons


@pytest.mark.parametrize("image", [np.zeros((96, 96), np.uint8), np.full((96, 96), 128, np.uint8),
                                   np.full((96, 96), 255, np.uint8), checkerboard_image(lo=0, hi=255)],
                         ids=["black", "flat-grey", "white", "saturated-checkerboard"])
def test_blank_or_saturated_image(image):
    engine, pred = make_engine()
    s = Feeder(engine).run(0.2, image=lambda t: image.copy())[-1]
    assert s.state == "NO_SIGNAL" and s.reasons[0] == "image blank or saturated"
    assert s.instruction == "Guidance unavailable: image blank or saturated"
    assert pred.calls == 0   # no inference on a blank frame


@pytest.mark.parametrize("make", [lambda t: noise_image(seed=int(t * 1000)), lambda t: checkerboard_image(),
                                  lambda t: texture_image(seed=int(t * 1000))],
                         ids=["noise", "checkerboard", "texture"])
def test_non_ultrasound_input_is_out_of_distribution_even_if_the_model_is_confident(make):
    engine, _ = make_engine(make_output("A4C", 0.99, quality=0.9), frozen_s=10)
    s = Feeder(engine).run(0.5, image=make)[-1]
    assert s.state == "SEARCHING" and not s.available and s.action is None
    assert "input does not look like a cardiac view" in s.reasons


def test_lung_like_image_passes_image_check_and_model_other_class_decides():
    engine, pred = make_engine(make_output("OTHER", 0.95, quality=0.02, distance=3.0, action_conf=0.2))
    s = Feeder(engine).run(0.5, image=lung_image)[-1]
    assert s.state == "SEARCHING" and s.available and s.view == "OTHER" and s.action is None


def test_far_from_any_view_a_confident_model_still_shows_the_way():
    """OTHER and far, but the action is clear (anatomy in sight): an arrow, not a blind search."""
    engine, pred = make_engine(make_output("OTHER", 0.9, quality=0.02, action="SLIDE_HEAD", distance=4.0,
                                           action_conf=0.8))
    s = Feeder(engine).run(1.0)[-1]
    assert (s.state, s.action, s.available) == ("GUIDING", "SLIDE_HEAD", True)


def test_a_blind_frame_shows_the_window_first_move_not_the_action_heads_guess():
    """Over rib or lung shadow (a near-black frame) the action head's "rotate" is a guess; the arrow
    follows the largest predicted slide, tilt or rock offset instead, which brings the heart into view."""
    out = make_output("OTHER", 0.9, quality=0.02, action="ROTATE_CW", distance=5.0, action_conf=0.8)
    pose = np.array(out.pose_offset)
    pose[:, 3] = -2.0                             # tilt away; rotation (5.0) is still the largest offset
    out = replace(out, pose_offset=pose)
    dark = np.zeros((96, 96), np.uint8)
    dark[:6, 33:63] = 120                         # the skin line only: 98 % dark
    blind = Feeder(make_engine(out)[0]).run(1.0, image=lambda t: dark.copy())[-1]
    assert (blind.action, blind.instruction) == ("TILT_AWAY", NO_HEART_IN_VIEW + "tilt the beam away from the marker side")
    off = Feeder(make_engine(out, blind_dark_fraction=None)[0]).run(1.0, image=lambda t: dark.copy())[-1]
    assert (off.action, off.instruction) == ("ROTATE_CW", ACTION_TEXT["ROTATE_CW"])
    seen = Feeder(make_engine(out)[0]).run(1.0)[-1]                             # tissue in view: the model's move
    assert (seen.action, seen.instruction) == ("ROTATE_CW", ACTION_TEXT["ROTATE_CW"])
    psax = make_engine(out)[0]                     # not in window_first_views: the model's move, said why
    psax.set_target("PSAX")
    s = Feeder(psax).run(1.0, image=lambda t: dark.copy())[-1]
    rotate = ACTION_TEXT["ROTATE_CW"]
    assert (s.target, s.action, s.instruction) == ("PSAX", "ROTATE_CW", NO_HEART_IN_VIEW + rotate[0].lower() + rotate[1:])


def test_window_first_probs_pick_the_largest_non_rotation_offset_per_view_or_keep_the_action_head():
    pose = np.zeros((5, 5))
    pose[0] = [0.5, -1.0, 9.0, 0.2, 0.0]          # rotation is largest, then slide right
    pose[1] = [0.0, 0.0, 0.0, 0.0, 2.0]           # rock toward the marker
    pose[2] = [-3.0, 0.0, 0.0, 2.0, 0.0]          # slide toward the feet
    pose[3] = [0.2, -0.1, -6.0, 0.25, 0.0]        # only rotation is off: no way to the window
    action_head = np.full((5, len(ACTIONS)), 1.0 / len(ACTIONS))
    action_head[3] = np.eye(len(ACTIONS))[ACTIONS.index("ROTATE_CCW")]
    probs = window_first_probs(pose, action_head)
    assert [ACTIONS[a] for a in probs.argmax(1)[:3]] == ["SLIDE_RIGHT", "ROCK_MARKER", "SLIDE_FEET"]
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert probs[:3].max(1) == pytest.approx([0.9] * 3)
    np.testing.assert_array_equal(probs[3:], action_head[3:])   # rows 3-4: the action head's own


def test_hold_with_poor_quality_turns_into_a_fine_correction_then_holds_again():
    """The model says 'at the target' but quality stays under the capture level: after hold_stuck_s
    one correction along the largest predicted pose offset, for one dwell time, then HOLD again."""
    import dataclasses

    out = make_output("A4C", 0.95, quality=0.5, action="HOLD")
    pose = np.zeros((5, 5))
    pose[:, 2] = -0.4                                  # the target is counter-clockwise of the probe
    out = dataclasses.replace(out, pose_offset=pose)
    engine, pred = make_engine(out, hold_stuck_s=2.0, min_dwell_s=0.8, smoothing_s=0.0)
    states = Feeder(engine).run(4.0)
    first_fine = next(s.t for s in states if s.state == "GUIDING")
    assert all(s.state == "HOLD" for s in states if s.t < first_fine)
    assert 2.0 - 1e-6 <= first_fine <= 2.1
    fine = [s for s in states if first_fine <= s.t < first_fine + 0.8]
    assert fine and all(s.action == "ROTATE_CCW" for s in fine)
    assert all(s.state == "HOLD" for s in states if first_fine + 0.85 <= s.t < first_fine + 2.7)


def test_quality_flickering_at_the_capture_level_still_gets_a_fine_correction():
    """At the edge of the target the smoothed quality wobbles around the capture level (hand tremor):
    the hold never lasts capture_hold_s, so after hold_stuck_s in HOLD one fine correction is shown
    (at a moment the quality is under the level), instead of waiting in HOLD until time runs out."""
    import dataclasses

    pose = np.zeros((5, 5))
    pose[:, 0] = 0.5                                   # the target is toward the head
    high, low = (dataclasses.replace(make_output("A4C", 0.95, quality=q, action="HOLD"), pose_offset=pose)
                 for q in (0.9, 0.8))
    engine, pred = make_engine(high, hold_stuck_s=2.0, min_dwell_s=0.8, smoothing_s=0.0, capture_hold_s=1.5)
    feed = Feeder(engine)
    states = []
    for i in range(8):                                 # 0.5 s above the capture level, 0.5 s under it
        states += feed.run(0.5, output=high if i % 2 == 0 else low, predictor=pred)
    assert not states[-1].captures
    fine = [s for s in states if s.state == "GUIDING"]
    assert fine and all(s.action == "SLIDE_HEAD" and s.quality < engine.config.capture_level("A4C") for s in fine)
    assert 2.0 <= fine[0].t <= 3.0
    assert all(s.state == "HOLD" for s in states if s.t < fine[0].t)


def test_energy_gate_only_when_set():
    predictor = ScriptedPredictor(make_output(ood=-2.0))
    predictor.manifest = {"thresholds": {"quality_diagnostic": 0.7, "confidence_min": 0.5, "ood_energy_max": -4.0}}
    engine = GuidanceEngine(None, predictor, clock=FakeClock())
    assert (engine.config.quality_threshold, engine.config.min_confidence, engine.config.max_ood_energy) == (0.7, 0.5, None)
    assert Feeder(engine).run(0.5)[-1].available              # the manifest's energy threshold is not applied
    engine = GuidanceEngine(None, predictor, EngineConfig(max_ood_energy=-4.0), clock=FakeClock())
    feed = Feeder(engine)
    assert "input does not look like a cardiac view" in feed.run(0.5)[-1].reasons
    predictor.output = make_output(ood=-9.0)
    assert feed.run(1.0)[-1].available
    assert engine.latest().quality_threshold == 0.7


def test_low_confidence_is_model_unsure():
    engine, pred = make_engine(make_output("A4C", 0.3))
    s = Feeder(engine).run(0.5)[-1]
    assert s.state == "SEARCHING" and s.reasons == ("model unsure",) and s.view == "A4C"


def test_slow_inference_gate_and_recovery():
    engine, pred = make_engine(delay_s=0.150, latency_budget_ms=100)
    feed = Feeder(engine)
    s = feed.run(0.5)[-1]
    assert "inference too slow" in s.reasons and s.latency_ms == pytest.approx(150, abs=1)
    pred.delay_s = 0.010
    assert feed.run(1.5)[-1].available


def test_one_outlier_frame_does_not_change_view_or_instruction():
    engine, pred = make_engine(make_output("A4C", 0.85, action="SLIDE_HEAD"))
    feed = Feeder(engine)
    feed.run(1.0)
    pred.output = make_output("A2C", 0.85, action="ROTATE_CCW")
    s = feed.run(1 / FPS)[-1]
    pred.output = make_output("A4C", 0.85, action="SLIDE_HEAD")
    s2 = feed.run(1 / FPS)[-1]
    assert (s.view, s.action) == ("A4C", "SLIDE_HEAD") and (s2.view, s2.action) == ("A4C", "SLIDE_HEAD")


def test_a_lasting_change_of_action_shows_after_smoothing_and_dwell():
    engine, pred = make_engine(make_output(action="SLIDE_HEAD"), min_dwell_s=0.8)
    feed = Feeder(engine)
    feed.run(1.0)
    pred.output = make_output(action="ROCK_AWAY")
    states = feed.run(1.0)
    switch = next(i for i, s in enumerate(states) if s.action == "ROCK_AWAY")
    assert 0.05 < switch / FPS < 0.5   # smoothing delays it a little, it then stays
    assert all(s.action == "ROCK_AWAY" for s in states[switch:])


def test_diagnostic_but_under_the_capture_level_says_nearly_there():
    """Between the diagnostic threshold and the capture level the app still guides, and says why."""
    engine, _ = make_engine(make_output(quality=0.7, action="SLIDE_LEFT"))
    s = Feeder(engine).run(1.0)[-1]
    assert engine.config.quality_threshold <= s.quality < engine.config.capture_level(s.target)
    assert (s.state, s.action) == ("GUIDING", "SLIDE_LEFT")
    assert s.instruction == "Nearly there: " + ACTION_TEXT["SLIDE_LEFT"][0].lower() + ACTION_TEXT["SLIDE_LEFT"][1:]


def test_quality_threshold_means_hold_whatever_the_action_head_says():
    engine, _ = make_engine(make_output(quality=0.9, action="SLIDE_LEFT"), capture_hold_s=100)
    s = Feeder(engine).run(0.5)[-1]
    assert (s.state, s.action) == ("HOLD", "HOLD") and s.instruction.startswith("Hold still")
    assert 0 < s.hold_progress < 0.1


def test_set_target_validates_and_updates_state():
    engine, _ = make_engine()
    with pytest.raises(ValueError, match="choose one of PLAX"):
        engine.set_target("A5C")
    Feeder(engine).run(0.3)
    engine.set_target("psax")
    s = engine.latest()
    assert s.target == "PSAX" and s.action is None and s.state == "SEARCHING"


def test_model_output_validation():
    with pytest.raises(ValueError, match="action_probs has shape"):
        ModelOutput(np.ones(6) / 6, np.zeros(5), np.zeros((5, 3)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="NaN"):
        ModelOutput(np.full(6, np.nan), np.zeros(5), np.zeros((5, 11)), np.zeros((5, 5)))
    out = make_output("PSAX", 0.7)
    assert out.confidence == pytest.approx(0.7) and not out.view_probs.flags.writeable


def test_config_validation():
    with pytest.raises(ValueError, match="time_base"):
        EngineConfig(time_base="wall").resolved()
    with pytest.raises(ValueError, match="quality_threshold"):
        EngineConfig(quality_threshold=1.5).resolved()
    with pytest.raises(ValueError, match="latency_budget_ms"):
        EngineConfig(latency_budget_ms=0).resolved()
    with pytest.raises(ValueError, match="reversal_block_s"):
        EngineConfig(reversal_block_s=-1).resolved()
    with pytest.raises(ValueError, match="reversals"):
        EngineConfig(reversals=0).resolved()
    for bad in (1.5, {"A4C": None}, {**dict.fromkeys(VIEWS, None), "PLAX": -0.1}):
        with pytest.raises(ValueError, match="capture_check_slack"):
            EngineConfig(capture_check_slack=bad).resolved()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="blind_dark_fraction"):
            EngineConfig(blind_dark_fraction=bad).resolved()
    with pytest.raises(ValueError, match="window_first_views"):
        EngineConfig(window_first_views=("PLAX", "LUNG")).resolved()


def test_an_instruction_that_keeps_reversing_gives_way_to_the_next_best_axis():
    """The model flips between CW and CCW (it cannot read rotation from these images): after the
    second reversal the engine shows its next-best instruction instead of making the hand wiggle."""
    def output(action):
        out = make_output(action=action, action_conf=0.6)
        probs = np.array(out.action_probs)
        probs[:, ACTIONS.index("ROCK_AWAY")] = 0.3
        return replace(out, action_probs=probs)

    def shown(**config):
        engine, pred = make_engine(output("ROTATE_CW"), smoothing_s=0.0, **config)
        feed, actions = Feeder(engine), []
        for action in ("ROTATE_CW", "ROTATE_CCW", "ROTATE_CW", "ROTATE_CCW"):
            pred.output = output(action)
            actions.append({s.action for s in feed.run(1.0)})
        return actions

    assert shown() == [{"ROTATE_CW"}, {"ROTATE_CCW"}, {"ROCK_AWAY"}, {"ROCK_AWAY"}]
    assert shown(reversal_block_s=0.0) == [{"ROTATE_CW"}, {"ROTATE_CCW"}, {"ROTATE_CW"}, {"ROTATE_CCW"}]


@pytest.mark.parametrize("perturbed_quality, check_off_for, captured",
                         [(0.95, (), True), (0.5, (), False), (0.5, ("A4C",), True), (0.5, ("PLAX", "PSAX"), False)])
def test_capture_check_needs_quality_that_holds_under_small_image_changes(perturbed_quality, check_off_for, captured):
    """With capture_check_slack set (the default), a hold at the capture level captures only if the model's
    quality stays up on shifted, zoomed, brighter ... copies of frames from the hold; a view whose slack
    is None (per view) captures without the check, the others keep it."""
    fed = []

    def image(t):
        fed.append(us_image(t))
        return fed[-1]

    def script(img, call):
        seen = any(img is f for f in fed[-60:])
        return make_output("A4C", 0.95, quality=0.95 if seen else perturbed_quality, action="HOLD")

    engine, pred = make_engine(capture_check_slack={v: None if v in check_off_for else 0.03 for v in VIEWS})
    pred.script = script
    states = Feeder(engine).run(4.0, image=image)
    assert bool(states[-1].captures) == captured
    assert any(s.state == "HOLD" for s in states)
    if not captured:   # the hold restarts: the app keeps asking to hold still, it never says "captured"
        assert all(s.state != "CAPTURED" for s in states)
        assert any("not clear enough to save" in s.instruction for s in states)


def test_perturbations_keep_the_frame_format():
    from edge_app.safety import perturbations

    img = us_image(0.0, size=96)[:80]                      # not square
    out = perturbations(img)
    assert len(out) == 8 and out[0] is img
    assert all(p.shape == img.shape and p.dtype == np.uint8 for p in out)
    assert all(not np.array_equal(p, img) for p in out[1:])
