"""The simulator honours the Source contract and the registry spec."""
import time

import numpy as np
import pytest

from devices.base import Frame, SourceError, create_source
from devices.labels import ACTIONS, POSE_SCALE
from devices.sim import SimSpecError, SimulatedProbe, from_spec


def test_create_source_spec_and_read_frames():
    with create_source("sim:seed=3,view=PLAX,fps=50,realtime=0,size=64") as src:
        assert src.name == "sim:seed=3" and src.fps == 50
        f0, f1 = src.read(), src.read()
    assert isinstance(f0, Frame) and f0.image.dtype == np.uint8 and f0.image.shape == (64, 64)
    assert (f0.index, f1.index) == (0, 1)
    assert f1.t - f0.t == pytest.approx(1 / 50)           # simulated time when not realtime
    assert f0.pose.shape == (4, 4) and f0.spacing_mm[0] > 0
    assert f0.labels["view"] == 0 and f0.labels["patient_seed"] == 3
    assert not f0.image.flags.writeable


def test_realtime_read_is_paced():
    src = SimulatedProbe(0, fps=40.0, settings=None, realtime=True)
    with src:
        src.read()
        t0 = time.monotonic()
        for _ in range(4):
            f = src.read(timeout=1.0)
        elapsed = time.monotonic() - t0
    assert 0.08 <= elapsed < 0.5 and f.index == 4


def test_realtime_read_times_out_with_none():
    src = SimulatedProbe(0, fps=2.0, realtime=True).open()
    assert src.read(timeout=1.0) is not None
    assert src.read(timeout=0.01) is None


def test_move_by_action_name_index_and_delta():
    pr = SimulatedProbe(0, realtime=False)
    p0 = pr.pose
    p1 = pr.move("SLIDE_HEAD")
    assert p1[0] - p0[0] == pytest.approx(POSE_SCALE[0])
    p2 = pr.move(ACTIONS.index("ROTATE_CW"), step=0.5)
    assert p2[2] - p1[2] == pytest.approx(0.5 * POSE_SCALE[2])
    p3 = pr.move(np.array([0, 0, 0, 0, 5.0]))
    assert p3[4] - p2[4] == pytest.approx(5.0)
    assert np.array_equal(pr.move("HOLD"), p3)
    with pytest.raises(ValueError, match="unknown action"):
        pr.move("JUMP")
    with pytest.raises(ValueError, match="shape"):
        pr.move(np.zeros(3))


def test_pose_stays_on_the_skin():
    pr = SimulatedProbe(0, realtime=False)
    for _ in range(40):
        pr.move("SLIDE_FEET", step=3)
    assert pr.pose[0] >= -110.0
    img, _ = pr.render()
    assert img.dtype == np.uint8


@pytest.mark.parametrize("spec, match", [
    ("sim:seed=x", "bad value"), ("sim:color=red", "known key"), ("sim:view=A5C", "unknown view"),
    ("sim:depth=-3", "depth_mm"), ("sim:fps=0", "fps"), ("sim:seed=-1", "non-negative"), ("sim:realtime=maybe", "bad value"),
])
def test_bad_specs_are_source_errors(spec, match):
    with pytest.raises(SourceError, match=match):
        create_source(spec)


def test_spec_error_is_also_value_error_and_options_override():
    assert issubclass(SimSpecError, ValueError)
    p = from_spec("seed=2,size=64", realtime=False, fps=12.0)
    assert p.patient.seed == 2 and p.fps == 12.0 and p.settings.size_px == 64


def test_same_seed_same_patient_different_seed_different_patient():
    a, b, c = SimulatedProbe(9, realtime=False), SimulatedProbe(9, realtime=False), SimulatedProbe(10, realtime=False)
    assert a.patient == b.patient and a.patient != c.patient
    np.testing.assert_array_equal(a.target_pose("A4C"), b.target_pose("A4C"))
    assert not np.allclose(a.target_pose("A4C"), c.target_pose("A4C"))


def test_patients_vary_within_physiological_ranges():
    from devices.sim import make_patient
    ps = [make_patient(s) for s in range(40)]
    hr = [p.heart_rate_bpm for p in ps]
    lv = [2 * p.lv_radius_mm for p in ps]
    assert 55 <= min(hr) and max(hr) <= 100 and np.std(hr) > 5
    assert 38 <= min(lv) and max(lv) <= 60
    assert len({round(p.fat_mm) for p in ps}) > 5


def test_importing_devices_sim_stays_light():
    import subprocess
    import sys
    code = "import sys, devices.sim; assert 'torch' not in sys.modules and 'scipy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
