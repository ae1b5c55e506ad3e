"""Time-based smoothing and instruction hysteresis (edge_app.smoothing)."""
import math

import numpy as np
import pytest

from edge_app.smoothing import ActionSelector, TimeEMA


@pytest.mark.parametrize("fps", [15.0, 30.0, 60.0])
def test_ema_step_response_depends_on_time_not_frame_rate(fps):
    ema = TimeEMA(tau_s=0.2)
    ema.update(0.0, 0.0)
    t = 0.0
    while t < 0.2 - 1e-9:
        t += 1 / fps
        value = ema.update(1.0, t)
    # After one time constant a step has risen to 1 - 1/e, whatever the frame rate.
    assert value == pytest.approx(1 - math.exp(-t / 0.2), abs=1e-9)
    assert 0.55 < value < 0.7


def test_ema_arrays_first_sample_and_reset():
    ema = TimeEMA(0.1)
    first = ema.update(np.array([1.0, 2.0]), 5.0)
    np.testing.assert_allclose(first, [1.0, 2.0])
    ema.update(np.array([3.0, 2.0]), 5.1)
    assert 1.0 < ema.value[0] < 3.0 and ema.value[1] == pytest.approx(2.0)
    ema.reset()
    np.testing.assert_allclose(ema.update(np.array([7.0, 7.0]), 6.0), [7.0, 7.0])


def test_ema_restarts_when_time_goes_back():
    ema = TimeEMA(1.0)
    ema.update(0.0, 10.0)
    ema.update(0.0, 10.5)
    assert ema.update(5.0, 1.0) == 5.0   # a looping file: start again, no negative dt


def test_ema_zero_tau_is_latest_sample_and_negative_rejected():
    ema = TimeEMA(0.0)
    ema.update(1.0, 0.0)
    assert ema.update(4.0, 0.01) == 4.0
    with pytest.raises(ValueError, match="time constant"):
        TimeEMA(-1.0)


def _probs(best: int, p: float, n: int = 11) -> np.ndarray:
    out = np.full(n, (1 - p) / (n - 1))
    out[best] = p
    return out


def test_selector_holds_against_small_leads_and_switches_on_clear_ones():
    sel = ActionSelector(margin=0.15, min_dwell_s=0.5)
    assert sel.update(_probs(2, 0.6), 0.0) == 2
    # Another action slightly ahead (lead 0.1 < margin), long after the dwell: stay.
    mixed = np.zeros(11)
    mixed[2], mixed[4] = 0.4, 0.5
    assert sel.update(mixed, 2.0) == 2
    # A clear lead: switch.
    assert sel.update(_probs(4, 0.8), 2.1) == 4


def test_selector_minimum_dwell():
    sel = ActionSelector(margin=0.1, min_dwell_s=0.8)
    sel.update(_probs(0, 0.9), 0.0)
    assert sel.update(_probs(3, 0.9), 0.5) == 0      # too soon
    assert sel.update(_probs(3, 0.9), 0.79) == 0
    assert sel.update(_probs(3, 0.9), 0.81) == 3      # dwell over


def test_selector_does_not_flicker_on_alternating_noise():
    rng = np.random.default_rng(0)
    sel = ActionSelector(margin=0.15, min_dwell_s=0.5)
    ema = TimeEMA(0.2)
    shown = []
    for i in range(120):   # 4 s at 30 fps; two actions take turns being slightly ahead
        raw = _probs(2 if i % 2 else 3, 0.45) + rng.normal(0, 0.02, 11)
        shown.append(sel.update(ema.update(raw, i / 30), i / 30))
    changes = sum(a != b for a, b in zip(shown, shown[1:]))
    assert changes == 0


def test_selector_rejects_bad_settings():
    with pytest.raises(ValueError, match="margin"):
        ActionSelector(1.5, 0.1)
    with pytest.raises(ValueError, match="dwell"):
        ActionSelector(0.1, -1)
    with pytest.raises(ValueError, match="reversal"):
        ActionSelector(0.1, 0.5, block_s=5.0, reversals=0)


def _two(first: int, p_first: float, second: int) -> np.ndarray:
    """`first` at p_first, `second` just behind it."""
    out = _probs(first, p_first)
    out[second] = p_first - 0.2
    return out


def test_selector_sets_a_reversing_axis_aside_and_shows_the_next_best():
    cw, ccw, rock = 4, 5, 9                       # ROTATE_CW, ROTATE_CCW, ROCK_AWAY
    sel = ActionSelector(margin=0.1, min_dwell_s=0.8, block_s=5.0, window_s=6.0, reversals=2)
    assert sel.update(_two(cw, 0.7, rock), 0.0) == cw
    assert sel.update(_two(ccw, 0.7, rock), 1.0) == ccw     # first reversal: shown
    # Second reversal within the window: rotation is set aside, the next best shows at once.
    assert sel.update(_two(cw, 0.7, rock), 2.0) == rock
    assert sel.update(_two(ccw, 0.7, rock), 3.0) == rock     # either rotation is set aside
    assert sel.update(_two(ccw, 0.7, rock), 7.1) == ccw      # block over (5 s after 2.0)
    # Slow reversals (further apart than the window) never set the axis aside.
    slow = ActionSelector(margin=0.1, min_dwell_s=0.8, block_s=5.0, window_s=6.0, reversals=2)
    for i, a in enumerate([cw, ccw, cw, ccw]):
        assert slow.update(_two(a, 0.7, rock), 7.0 * i) == a
    # forget() clears the count: after it, one more reversal is shown again.
    sel.forget()
    assert sel.update(_two(cw, 0.7, rock), 8.0) == cw
    assert sel.update(_two(ccw, 0.7, rock), 9.0) == ccw


def test_selector_without_reversal_block_keeps_following_the_model():
    sel = ActionSelector(margin=0.1, min_dwell_s=0.8)        # block_s 0: off
    shown = [sel.update(_two(4 + i % 2, 0.7, 9), float(i)) for i in range(6)]
    assert shown == [4, 5, 4, 5, 4, 5]
    assert sel._shown == []     # nothing is kept when the block is off (hours of changes in a session)
