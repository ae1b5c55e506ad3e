"""Probe pose on the simulated patient: the conventions behind every guidance word.

Patient frame (millimetres, right-handed, patient supine):
    x: toward the patient's LEFT, y: toward the HEAD, z: ANTERIOR (out of the chest).
    Origin on the skin, on the midline, at the tip of the xiphoid process.
Skin: one gently curved surface for the chest and the upper abdomen,
    z = skin_z(x) = -x**2 / (2 * chest_radius_mm), a cylinder around the head-feet axis, so the
    parasternal (left of the sternum, above the xiphoid), apical (5th intercostal space, about the
    mid-clavicular line) and subcostal (below the xiphoid) windows are points of one surface.

Pose [5], order of devices.labels.POSE_AXES:
    slide_head_mm   y of the contact point (+ toward the head, - toward the feet)
    slide_left_mm   x of the contact point (+ toward the patient's left, - toward the right);
                    the contact point is (x, y, skin_z(x)).
    rotate_cw_deg   rotation about the beam axis, + clockwise as seen from BEHIND the probe (from
                    the sonographer's hand, looking along the beam into the patient). At 0 the index
                    marker points to the patient's head (12 o'clock on the chest), +90 to the
                    patient's left (3 o'clock), -90 to the right (9 o'clock), +-180 to the feet.
                    Wrapped to [-180, 180).
    tilt_marker_deg fanning: the beam leaves the image plane. + tilts the beam toward the probe face
                    that lies 90 deg counter-clockwise from the marker (seen from behind the
                    probe); with the marker to the patient's left (rotate +90, A4C / SC4C) a
                    + tilt aims the beam toward the head, which is how the subcostal window looks
                    up under the ribs (SC4C is a large + tilt).
    rock_marker_deg rocking: the beam turns within the image plane. + aims the beam toward the
                    marker side (screen right in the cardiology convention).

Orientation: R = S(x) @ R0 @ Rz(rotate) @ Rx(tilt) @ Ry(rock), intrinsic rotations in the probe
frame, applied in the order rotate -> tilt -> rock. The columns of R are the probe axes in the
patient frame: u (lateral, toward the index marker = screen RIGHT), n = w x u (elevation, out of
the image plane), w (beam axis, into the patient = screen DOWN). R0 is the probe perpendicular to
a flat chest with the marker toward the head (u=+y, n=+x, w=-z); S(x) turns it about the y axis so
that w follows the inward skin normal of the curved chest. A sample at range r_mm and in-plane angle
theta (+ toward the marker) lies at p + r_mm * (sin(theta) u + cos(theta) w); on screen the apex is
at the top centre, depth goes down and the marker side is on the right.

Frame.pose is the 4x4 [[u n w p], [0 0 0 1]] (rotation columns as above, p the contact point in mm).
"""
from __future__ import annotations

import numpy as np

# Limits that keep the probe on the skin of the modelled region and the angles sane.
SLIDE_HEAD_RANGE_MM = (-110.0, 150.0)
SLIDE_LEFT_RANGE_MM = (-70.0, 150.0)
TILT_RANGE_DEG = (-80.0, 80.0)
ROCK_RANGE_DEG = (-70.0, 70.0)

_R0 = np.array([[0.0, 1.0, 0.0],
                [1.0, 0.0, 0.0],
                [0.0, 0.0, -1.0]])  # columns u0=+y, n0=+x, w0=-z


def wrap_deg(a: np.ndarray | float) -> np.ndarray | float:
    """Wrap angles in degrees to [-180, 180)."""
    return (np.asarray(a, dtype=np.float64) + 180.0) % 360.0 - 180.0


def wrap_offset(offset: np.ndarray) -> np.ndarray:
    """Pose offsets [..., 5] with the rotation axis wrapped to [-180, 180)."""
    out = np.array(offset, dtype=np.float64)
    out[..., 2] = wrap_deg(out[..., 2])
    return out


def clip_pose(pose: np.ndarray) -> np.ndarray:
    """Keep a pose [5] on the modelled skin and inside the angle limits (rotation wrapped).

    Raises:
        ValueError: the pose is not 5 finite numbers.
    """
    try:
        p = np.array(pose, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        p = np.zeros(0)
    if p.shape != (5,) or not np.isfinite(p).all():
        raise ValueError(f"a probe pose must be 5 finite numbers (slide_head_mm, slide_left_mm, rotate_cw_deg, "
                         f"tilt_marker_deg, rock_marker_deg), got {pose!r}")
    p[0] = np.clip(p[0], *SLIDE_HEAD_RANGE_MM)
    p[1] = np.clip(p[1], *SLIDE_LEFT_RANGE_MM)
    p[2] = wrap_deg(p[2])
    p[3] = np.clip(p[3], *TILT_RANGE_DEG)
    p[4] = np.clip(p[4], *ROCK_RANGE_DEG)
    return p


def skin_z(x_mm: np.ndarray | float, chest_radius_mm: float) -> np.ndarray | float:
    """Height of the skin (z, mm) at lateral position x (mm)."""
    return -np.square(x_mm) / (2.0 * chest_radius_mm)


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _skin_frame(x_mm: float, chest_radius_mm: float) -> np.ndarray:
    """S(x) @ R0: probe perpendicular to the skin at x, marker toward the head."""
    return _ry(np.arctan(x_mm / chest_radius_mm)) @ _R0


def probe_axes(pose: np.ndarray, chest_radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Contact point p [3] and rotation R [3, 3] (columns u, n, w) of a pose [5]."""
    head, left, rot, tilt, rock = (float(v) for v in pose)
    r = _skin_frame(left, chest_radius_mm) @ _rz(np.radians(rot)) @ _rx(np.radians(tilt)) @ _ry(np.radians(rock))
    p = np.array([left, head, skin_z(left, chest_radius_mm)])
    return p, r


def pose_matrix(pose: np.ndarray, chest_radius_mm: float) -> np.ndarray:
    """4x4 homogeneous probe pose (columns u, n, w, p in the patient frame, mm) for Frame.pose."""
    p, r = probe_axes(pose, chest_radius_mm)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = p
    return m


def pose_from_axes(x_mm: float, y_mm: float, beam: np.ndarray, marker: np.ndarray,
                   chest_radius_mm: float) -> np.ndarray:
    """Inverse of probe_axes: pose [5] of a probe at skin point (x, y) with a beam and marker direction.

    `marker` is made orthogonal to `beam` first. Angles come from R = S R0 Rz Rx Ry (ZXY Euler).
    """
    w = np.asarray(beam, dtype=np.float64)
    w = w / np.linalg.norm(w)
    u = np.asarray(marker, dtype=np.float64)
    u = u - (u @ w) * w
    u = u / np.linalg.norm(u)
    r = np.stack([u, np.cross(w, u), w], axis=1)
    m = _skin_frame(x_mm, chest_radius_mm).T @ r
    tilt = np.arcsin(np.clip(m[2, 1], -1.0, 1.0))
    rock = np.arctan2(-m[2, 0], m[2, 2])
    rot = np.arctan2(-m[0, 1], m[1, 1])
    return np.array([y_mm, x_mm, float(wrap_deg(np.degrees(rot))), np.degrees(tilt), np.degrees(rock)])
