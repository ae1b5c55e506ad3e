"""Pose conventions of the simulator (devices/sim/pose.py): they define the guidance words."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.sim.pose import clip_pose, pose_from_axes, pose_matrix, probe_axes, skin_z, wrap_deg

RC = 170.0


def axes(pose):
    p, r = probe_axes(np.asarray(pose, float), RC)
    return p, r[:, 0], r[:, 1], r[:, 2]  # point, marker u, elevation n, beam w


def test_reference_probe_points_into_the_chest_with_marker_to_the_head():
    p, u, n, w = axes([0, 0, 0, 0, 0])
    np.testing.assert_allclose(p, [0, 0, 0])
    np.testing.assert_allclose(w, [0, 0, -1], atol=1e-12)   # posterior
    np.testing.assert_allclose(u, [0, 1, 0], atol=1e-12)    # head (12 o'clock)


@pytest.mark.parametrize("rot, marker", [(90, [1, 0, 0]), (-90, [-1, 0, 0]), (180, [0, -1, 0])])
def test_clockwise_rotation_moves_the_marker_from_12_to_3_oclock(rot, marker):
    _, u, _, w = axes([0, 0, rot, 0, 0])
    np.testing.assert_allclose(u, marker, atol=1e-12)
    np.testing.assert_allclose(w, [0, 0, -1], atol=1e-12)


def test_positive_tilt_with_marker_left_aims_the_beam_at_the_head():
    _, _, _, w = axes([0, 0, 90, 30, 0])
    assert w[1] > 0.45 and w[2] < 0  # toward the head, still into the body


def test_positive_rock_aims_the_beam_toward_the_marker():
    _, u0, _, _ = axes([0, 0, 90, 0, 0])
    _, _, _, w = axes([0, 0, 90, 0, 20])
    assert w @ u0 > 0.3


def test_slides_move_the_contact_point_on_the_curved_skin():
    p, _, _, w = axes([40, 80, 0, 0, 0])
    np.testing.assert_allclose(p, [80, 40, skin_z(80, RC)])
    assert w[0] < 0 and w[2] < 0  # perpendicular to the curved skin: toward the midline and back


def test_pose_matrix_is_a_rigid_transform():
    m = pose_matrix(np.array([10, 50, 33, -12, 7.0]), RC)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


@settings(max_examples=60, deadline=None)
@given(st.floats(-100, 140), st.floats(-60, 140), st.floats(-179, 179), st.floats(-75, 75), st.floats(-65, 65))
def test_pose_from_axes_inverts_probe_axes(head, left, rot, tilt, rock):
    pose = np.array([head, left, rot, tilt, rock])
    p, r = probe_axes(pose, RC)
    back = pose_from_axes(p[0], p[1], r[:, 2], r[:, 0], RC)
    diff = back - pose
    diff[2] = wrap_deg(diff[2])
    np.testing.assert_allclose(diff, 0, atol=1e-6)


def test_clip_wraps_rotation_and_limits_angles():
    p = clip_pose([0, 0, 190, 200, -200])
    assert p[2] == pytest.approx(-170)
    assert p[3] <= 80 and p[4] >= -70


@pytest.mark.parametrize("bad", [[1, 2, 3], [0, 0, np.nan, 0, 0], "pose"])
def test_bad_pose_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="5 finite numbers"):
        clip_pose(bad)
