"""Ground truth of the simulator: targets, quality, best action, view label, oracle guidance."""
import numpy as np
import pytest

from devices.labels import ACTIONS, HOLD, HOLD_RADIUS_MIN, QUALITY_GOOD, action_delta, HOLD_RADIUS, OTHER, POSE_SCALE, VIEW_LABELS, VIEWS, pose_distance
from tests.helpers_sim import CLEAR_SEEDS, probe


@pytest.mark.parametrize("seed", CLEAR_SEEDS)
def test_clear_window_patients_are_clear(seed):
    pr = probe(seed)
    for v in ("PLAX", "A4C", "SC4C"):
        assert pr.labels(pr.target_pose(v))["acoustic"] >= 0.9, v


@pytest.mark.parametrize("seed", CLEAR_SEEDS)
@pytest.mark.parametrize("view", VIEWS)
def test_target_pose_is_labelled_as_its_view_with_high_quality(seed, view):
    pr = probe(seed)
    lab = pr.labels(pr.target_pose(view))
    i = VIEWS.index(view)
    assert VIEW_LABELS[lab["view"]] == view
    assert lab["action"][i] == HOLD
    np.testing.assert_allclose(lab["pose_offset"][i], 0.0, atol=1e-4)
    assert lab["quality"][i] == pytest.approx(lab["acoustic"])
    assert lab["quality"][i] >= 0.9  # PSAX too: its rib shadows fall at the sector edges


def test_label_types_and_shapes():
    pr = probe(1)
    lab = pr.labels(pr.target_pose("A4C"), t=0.3)
    assert lab["pose_offset"].shape == (5, 5) and lab["pose_offset"].dtype == np.float32
    assert lab["action"].shape == (5,) and lab["action"].dtype == np.int64
    assert lab["quality"].shape == (5,) and lab["quality"].dtype == np.float32
    assert ((lab["quality"] >= 0) & (lab["quality"] <= 1)).all()
    assert isinstance(lab["view"], int) and isinstance(lab["acoustic"], float)
    assert lab["pose"].dtype == np.float64 and lab["patient_seed"] == 1


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("axis", range(5))
def test_quality_falls_monotonically_moving_away(view, axis):
    """The geometric part of the quality (quality / acoustic) falls monotonically along every axis."""
    pr = probe(0)
    target = pr.target_pose(view)
    i = VIEWS.index(view)
    qs = []
    for k in (0.0, 0.5, 1.0, 1.5, 2.5, 4.0):
        pose = target.copy()
        pose[axis] += k * POSE_SCALE[axis]
        pose = pr.set_pose(pose)  # clipped like the probe would be
        lab = pr.labels(pose)
        qs.append(lab["quality"][i] / max(lab["acoustic"], 1e-9))
    assert all(a >= b - 1e-6 for a, b in zip(qs, qs[1:])), qs
    # 4 units of turning the beam leave a poor image; a slide within the plane keeps the cut,
    # only moves the heart off the centre line
    assert qs[0] == pytest.approx(1.0) and qs[-1] < (0.5 if axis < 2 else 0.05)


def test_a_slide_compensated_by_a_tilt_keeps_the_cut_and_the_quality():
    """Quality is measured on the cut through the heart: sliding 15 mm out of the SC4C plane and
    tilting the beam back onto the heart gives (nearly) the target image, and a good quality, though
    the probe is far from the canonical pose; the uncompensated slide does not."""
    from scipy.ndimage import gaussian_filter

    pr = probe(3)
    i = VIEWS.index("SC4C")
    target = pr.target_pose("SC4C")
    slid = target + np.array([15.0, 0, 0, 0, 0])
    tilts = np.linspace(-25.0, 25.0, 101)
    back = min((slid + np.array([0, 0, 0, t, 0]) for t in tilts), key=lambda p: pr.plane_distance(p)[i])
    assert pose_distance(pr.labels(back)["pose_offset"][i]) > 1.5
    assert pr.plane_distance(back)[i] < 0.5 < 1.0 < pr.plane_distance(slid)[i]

    def smooth(pose):
        return gaussian_filter(pr.render(pose, 0.0)[0].astype(np.float32), 3)

    ref = smooth(target)
    assert np.abs(smooth(back) - ref).mean() < np.abs(smooth(slid) - ref).mean()


def test_best_action_reduces_the_distance_and_hold_only_near_target():
    pr = probe(2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        pose = pr.sample_pose(rng, "near", spread=1.5)
        lab = pr.labels(pose)
        for i, view in enumerate(VIEWS):
            d0 = pose_distance(lab["pose_offset"][i])
            a = int(lab["action"][i])
            if a == HOLD:
                assert d0 <= HOLD_RADIUS + 1e-6
                assert lab["quality"][i] >= QUALITY_GOOD or d0 <= HOLD_RADIUS_MIN + 1e-6
                continue
            assert d0 > HOLD_RADIUS or (d0 > HOLD_RADIUS_MIN and lab["quality"][i] < QUALITY_GOOD)
            after = pr.labels(pose + action_delta(a, 0.25))
            assert pose_distance(after["pose_offset"][i]) < d0, (view, ACTIONS[a])


def test_far_from_every_target_is_other():
    pr = probe(0)
    lab = pr.labels(np.array([-100.0, -60.0, 0.0, 0.0, 0.0]))
    assert VIEW_LABELS[lab["view"]] == OTHER
    assert lab["quality"].max() < 0.01


def test_labels_agree_with_render_and_do_not_depend_on_output_size():
    small, big = probe(3, 64), probe(3, 128)
    pose = small.sample_pose(np.random.default_rng(5), "near", view="PLAX", spread=0.5)
    a = small.labels(pose, t=0.2)
    _, b = small.render(pose, t=0.2)
    _, c = big.render(pose, t=0.2)
    for k in ("pose_offset", "action", "quality"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])
    assert a["view"] == b["view"] == c["view"]


@pytest.mark.parametrize("view", VIEWS)
def test_oracle_novice_reaches_hold_from_its_window(view):
    """A novice who follows the true best action in half steps (fine steps after 40 moves: a half
    step can overshoot a small offset back and forth) reaches HOLD in < 60 moves."""
    i = VIEWS.index(view)
    for seed in (0, 7):
        pr = probe(seed)
        rng = np.random.default_rng([seed, i])
        for _ in range(8):
            pr.set_pose(pr.sample_pose(rng, "window", view=view))
            for step in range(60):
                a = int(pr.labels()["action"][i])
                if a == HOLD:
                    break
                pr.move(a, step=0.5 if step < 40 else 0.2)
            assert a == HOLD, (seed, view, pr.pose)


def test_sample_pose_modes_and_errors():
    pr = probe(0)
    rng = np.random.default_rng(0)
    near = [pose_distance(pr.labels(pr.sample_pose(rng, "near", view="A4C", spread=0.3))["pose_offset"][2])
            for _ in range(20)]
    assert np.median(near) < 1.0
    for _ in range(10):
        p = pr.sample_pose(rng, "window", view="SC4C")
        assert np.all(np.abs(p[:2] - pr.target_pose("SC4C")[:2]) <= 25.0 + 1e-9)
    with pytest.raises(ValueError, match="unknown sample mode"):
        pr.sample_pose(rng, "everywhere")
    with pytest.raises(ValueError, match="unknown view"):
        pr.sample_pose(rng, "near", view="A5C")
    with pytest.raises(ValueError, match="no target"):
        pr.target_pose("OTHER")


def test_hold_needs_a_good_image_unless_right_at_the_target():
    from devices.labels import best_action

    offset = np.array([[5.0, 0, 0, 0, 0]] * 3)          # 0.5 normalized units: inside HOLD_RADIUS
    at = np.array([[2.0, 0, 0, 0, 0]])                  # 0.2: inside HOLD_RADIUS_MIN
    assert best_action(offset).tolist() == [HOLD] * 3   # no quality given: pose alone
    slide = ACTIONS.index("SLIDE_HEAD")
    assert best_action(offset, np.array([0.8, 0.7, 0.4])).tolist() == [HOLD, slide, slide]
    assert best_action(at, np.array([0.1])).tolist() == [HOLD]


def test_a_rib_shadow_costs_less_at_the_sector_edge_than_on_the_centre_line():
    r = probe(0)._renderer
    heart = int(np.flatnonzero(r.layer_heart)[0])
    n_lines, n_samples = r.coarse.n_lines, r.coarse.n_samples
    clear = np.full((n_lines, n_samples), heart)
    edge, centre = clear.copy(), clear.copy()
    edge[:3, 0] = r.RIB_ID                                   # three lines at one edge
    centre[n_lines // 2 - 1:n_lines // 2 + 2, 0] = r.RIB_ID  # three lines in the middle
    assert r._visible_fraction(clear) == pytest.approx(1.0)
    assert 1.0 > r._visible_fraction(edge) > 1.0 - 3 / n_lines > r._visible_fraction(centre) > 0.0


def _cycle_quality(pr, pose, view):
    return float(np.mean([pr.labels(pose, t)["quality"][VIEWS.index(view)] for t in np.linspace(0.0, 1.0, 8)]))


def test_a_shadowed_target_moves_to_the_best_window_nearby_and_a_clear_one_stays():
    from devices.sim.probe import TARGET_SEARCH_RADIUS
    pr = probe(1)  # its anatomical PSAX pose loses much of the LV behind a rib
    anatomical = pr.anatomy.targets["PSAX"]
    target = pr.target_pose("PSAX")
    moved = np.linalg.norm((target - anatomical) / POSE_SCALE)
    assert 0.0 < moved <= TARGET_SEARCH_RADIUS + 1e-9
    before, after = _cycle_quality(pr, anatomical, "PSAX"), _cycle_quality(pr, target, "PSAX")
    assert before < 0.85 and after >= before + 0.05, (before, after)
    at_anatomical = pr.labels(anatomical)  # quality still measures the cut against the anatomical plane
    assert at_anatomical["quality"][VIEWS.index("PSAX")] == pytest.approx(at_anatomical["acoustic"], abs=1e-5)
    lab = pr.labels(target)
    assert lab["action"][VIEWS.index("PSAX")] == HOLD
    np.testing.assert_allclose(lab["pose_offset"][VIEWS.index("PSAX")], 0.0, atol=1e-4)
    for view in VIEWS:  # patient 0 has clear windows: every target is the anatomical pose
        np.testing.assert_array_equal(probe(0).target_pose(view), probe(0).anatomy.targets[view])


def test_targets_do_not_move_with_scanner_settings():
    from devices.sim.probe import SimulatedProbe
    from devices.sim.render import ScanSettings
    default = SimulatedProbe(patient_seed=1, realtime=False)
    other = SimulatedProbe(patient_seed=1, realtime=False,
                           settings=ScanSettings(depth_mm=120.0, sector_deg=90.0, gain_db=5.0))
    for view in VIEWS:
        np.testing.assert_array_equal(default.target_pose(view), other.target_pose(view))
