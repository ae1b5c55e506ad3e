"""B-mode rendering: determinism, speckle fixed to tissue, shadows, settings, scan geometry."""
import numpy as np
import pytest

from devices.sim import ScanSettings, SimulatedProbe
from devices.sim.anatomy import CLASS
from tests.helpers_sim import corr, probe


def test_render_is_deterministic_bit_for_bit():
    a = SimulatedProbe(4, settings=ScanSettings(size_px=64), realtime=False)
    b = SimulatedProbe(4, settings=ScanSettings(size_px=64), realtime=False)
    pose = a.target_pose("PLAX") + np.array([3.0, -2.0, 5.0, 1.0, -2.0])
    ia, la = a.render(pose, 0.37)
    ib, lb = b.render(pose, 0.37)
    assert np.array_equal(ia, ib)
    assert np.array_equal(la["quality"], lb["quality"])


def test_different_patients_look_different():
    i0, _ = probe(0).render(probe(0).target_pose("A4C"), 0.0)
    i1, _ = probe(1).render(probe(1).target_pose("A4C"), 0.0)
    assert corr(i0, i1) < 0.8


def test_image_geometry_sector_apex_top_centre():
    img, _ = probe(0, 128).render(probe(0, 128).target_pose("SC4C"), 0.0)
    assert img.shape == (128, 128) and img.dtype == np.uint8
    assert img[:3, 60:68].any()           # apex at the top centre
    assert not img[:20, :25].any() and not img[:20, -25:].any()  # outside the sector: black
    assert not img[-5:, :].any()          # the 80 deg sector leaves the bottom rows empty


@pytest.mark.parametrize("view, axis", [("SC4C", 0), ("SC4C", 1), ("A4C", 1), ("PLAX", 1)])
def test_speckle_moves_with_the_tissue(view, axis):
    """A 1 mm slide keeps the image highly correlated; 20 mm decorrelates it (3D speckle field).

    (PLAX and A4C slid 20 mm toward the head land on the next rib: no image left to compare.)
    """
    pr = probe(0, 128)
    base = pr.target_pose(view)
    im0, _ = pr.render(base, 0.0)
    near, far = base.copy(), base.copy()
    near[axis] += 1.0
    far[axis] += 20.0
    im1, _ = pr.render(near, 0.0)
    im20, _ = pr.render(far, 0.0)
    m1 = (im0 > 0) & (im1 > 0)
    m20 = (im0 > 0) & (im20 > 0)
    assert m1.mean() > 0.2 and m20.mean() > 0.1
    assert corr(im0, im1, m1) > 0.85
    assert corr(im0, im20, m20) < 0.5


def test_speckle_is_fully_developed_in_homogeneous_tissue():
    """Liver under the subcostal probe: Rayleigh-like speckle, not a flat grey."""
    pr = probe(0, 128)
    im, _ = pr.render(pr.target_pose("SC4C"), 0.0)
    patch = im[12:30, 54:74].astype(float)
    assert patch.std() > 15 and 40 < patch.mean() < 220


def test_rib_casts_a_shadow_behind_it():
    pr = probe(0, 128)
    r = pr._renderer
    rib = r.RIB_ID
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(60):
        pose = pr.sample_pose(rng, "window", view="A4C")
        label = r.label_map(pose, 0.0)
        lines = np.flatnonzero((label == rib).any(axis=1))
        if lines.size == 0:
            continue
        found += 1
        # echo per sample: rendering the polar image is internal; check the transmitted energy instead:
        db = r.layer_db.take(label)
        cum = np.cumsum(db, axis=1)
        for ln in lines[:3]:
            j = int(np.argmax(label[ln] == rib))
            assert cum[ln, -1] - cum[ln, j] + db[ln, j] > 100.0   # > 100 dB lost through the rib: a shadow
        if found >= 3:
            break
    assert found >= 1


def test_shadows_are_dark_in_the_image():
    """Lines behind bone or lung are black in the rendered image (heart hidden at a bad spot)."""
    pr = probe(0, 128)
    rng = np.random.default_rng(11)
    dark = []
    for _ in range(30):
        pose = pr.sample_pose(rng, "random")
        img, lab = pr.render(pose, 0.0)
        dark.append((img[40:90, 30:98] < 20).mean())
    assert max(dark) > 0.9  # some random spots on the chest give an image that is almost all shadow


def test_heart_beats():
    pr = probe(0, 128)
    pose = pr.target_pose("A4C")
    period = 60.0 / pr.patient.heart_rate_bpm
    frames = [pr.render(pose, k * period / 8)[0] for k in range(8)]
    again, _ = pr.render(pose, period)
    assert min(corr(frames[0], f) for f in frames[1:]) < 0.9   # the image changes over the cycle
    assert corr(frames[0], again) > 0.97                       # and repeats every beat


def test_lv_cavity_is_dark_and_walls_brighter():
    pr = probe(5, 128)
    r = pr._renderer
    pose = pr.target_pose("PLAX")
    label = r.label_map(pose, 0.0)
    names = [l.name for l in pr.anatomy.layers]
    assert (label == names.index("lv_cavity")).sum() > 100
    assert (label == names.index("lv_myocardium")).sum() > 100
    assert r.layer_echo[names.index("lv_cavity")] < 0.05 < r.layer_echo[names.index("lv_myocardium")]
    assert pr.anatomy.layers[names.index("pericardium_lv")].cls == CLASS["pericardium"]


def test_gain_changes_brightness():
    pr = SimulatedProbe(0, settings=ScanSettings(size_px=64, gain_db=-15), realtime=False)
    dark, lab_dark = pr.render(pr.target_pose("A4C"), 0.0)
    pr.configure(gain_db=0.0)
    normal, lab = pr.render(pr.target_pose("A4C"), 0.0)
    assert dark.mean() < normal.mean() - 10
    assert lab_dark["acoustic"] < lab["acoustic"]   # far-off gain lowers the quality


@pytest.mark.parametrize("change, match", [
    (dict(depth_mm=-10), "depth_mm"), (dict(sector_deg=200), "sector_deg"), (dict(size_px=8), "size_px"),
    (dict(gain_db=float("nan")), "gain_db"), (dict(n_lines=3), "n_lines"), (dict(size_px=64.5), "integer"),
])
def test_bad_settings_are_clear_value_errors(change, match):
    with pytest.raises(ValueError, match=match):
        ScanSettings(**change)


@pytest.mark.parametrize("size", [64, 256])
def test_sizes_and_spacing(size):
    pr = SimulatedProbe(0, settings=ScanSettings(size_px=size, depth_mm=150), realtime=False)
    img, _ = pr.render(pr.target_pose("PLAX"), 0.0)
    assert img.shape == (size, size)
    s = pr.spacing_mm[0]
    assert s * size == pytest.approx(max(150.0, 2 * 150.0 * np.sin(np.radians(40))))
