"""Label definitions shared by the simulator, training and the edge runtime (one module, no copies).

Pose offsets are "target minus current" along five axes. Axis i has two actions: ACTIONS[2*i] for a
positive offset and ACTIONS[2*i + 1] for a negative one; HOLD is last. The sign conventions of each
axis (what "clockwise" or "toward the marker" means geometrically) are fixed by the simulator
and documented in `devices/sim/pose.py`.
"""
from __future__ import annotations

import numpy as np

VIEWS: tuple[str, ...] = ("PLAX", "PSAX", "A4C", "A2C", "SC4C")
OTHER = "OTHER"
VIEW_LABELS: tuple[str, ...] = VIEWS + (OTHER,)  # model's view_logits order, [V+1]

POSE_AXES: tuple[str, ...] = (
    "slide_head_mm",    # + toward the patient's head, - toward the feet
    "slide_left_mm",    # + toward the patient's left, - toward the right
    "rotate_cw_deg",    # + clockwise about the beam axis, seen from behind the probe
    "tilt_marker_deg",  # + fan the beam out of plane toward the marker side
    "rock_marker_deg",  # + angle the beam in plane toward the marker
)
# One normalized unit per axis: a distance of 1 is "about one novice adjustment" away.
POSE_SCALE = np.array([10.0, 10.0, 12.0, 10.0, 10.0], dtype=np.float64)

ACTIONS: tuple[str, ...] = (
    "SLIDE_HEAD", "SLIDE_FEET",
    "SLIDE_LEFT", "SLIDE_RIGHT",
    "ROTATE_CW", "ROTATE_CCW",
    "TILT_MARKER", "TILT_AWAY",
    "ROCK_MARKER", "ROCK_AWAY",
    "HOLD",
)
HOLD = ACTIONS.index("HOLD")

ACTION_TEXT: dict[str, str] = {
    "SLIDE_HEAD": "Slide toward the patient's head",
    "SLIDE_FEET": "Slide toward the patient's feet",
    "SLIDE_LEFT": "Slide toward the patient's left",
    "SLIDE_RIGHT": "Slide toward the patient's right",
    "ROTATE_CW": "Rotate clockwise",
    "ROTATE_CCW": "Rotate counter-clockwise",
    "TILT_MARKER": "Tilt the beam toward the marker side",
    "TILT_AWAY": "Tilt the beam away from the marker side",
    "ROCK_MARKER": "Rock toward the marker",
    "ROCK_AWAY": "Rock away from the marker",
    "HOLD": "Hold still",
}

# Normalized pose distance under which the probe is "at" the target: the best action is HOLD when
# the image there is good (quality >= QUALITY_GOOD) ...
HOLD_RADIUS = 0.75
# ... and always inside this smaller radius: closer than this there is nothing left to correct, a
# poor image is the patient's window (rib or lung shadow), not the probe position.
HOLD_RADIUS_MIN = 0.3
# Normalized distance to the nearest target under which the frame is labelled as that view.
VIEW_RADIUS = 2.0
# Quality (0..1) at or above which an image is diagnostic (ASE-style grade 3 or better) ...
QUALITY_DIAGNOSTIC = 0.6
# ... and good (grade 4 or better): between the two, a teacher says "diagnostic, now refine it".
QUALITY_GOOD = 0.8
# The screen says how big a move is ("small / medium / large move") from the offset left along the
# instructed axis, in normalized pose units: under 0.75 small, under 1.5 medium, else large.
MOVE_SIZES = ("small", "medium", "large")
MOVE_SIZE_EDGES = (0.75, 1.5)


def move_size(magnitude: float) -> int:
    """Index into MOVE_SIZES of the move the screen asks for, given the offset along the axis."""
    return int(np.searchsorted(MOVE_SIZE_EDGES, float(magnitude), side="right"))


def view_index(name: str) -> int:
    """Index of a view name in VIEW_LABELS; raises ValueError naming the valid ones."""
    key = name.strip().upper()
    if key not in VIEW_LABELS:
        raise ValueError(f"unknown view '{name}': choose one of {', '.join(VIEW_LABELS)}")
    return VIEW_LABELS.index(key)


def pose_distance(offset: np.ndarray) -> np.ndarray:
    """Normalized distance of pose offsets [..., 5] (0 at the target)."""
    return np.linalg.norm(np.asarray(offset, dtype=np.float64) / POSE_SCALE, axis=-1)


def best_action(offset: np.ndarray, quality: np.ndarray | None = None) -> np.ndarray:
    """Best single action for pose offsets [..., 5] (target - current): index into ACTIONS.

    HOLD inside HOLD_RADIUS_MIN, and inside HOLD_RADIUS when `quality` [...] (of the same target) is
    good (>= QUALITY_GOOD) or not given; otherwise the axis with the largest normalized offset, in the
    direction that reduces it. Moving along that axis always reduces the pose distance. With quality,
    a probe near the target with a merely diagnostic image (a tilted cut, a partly shadowed window)
    is told to close the remaining gap instead of holding it.
    """
    z = np.asarray(offset, dtype=np.float64) / POSE_SCALE
    axis = np.argmax(np.abs(z), axis=-1)
    sign_negative = np.take_along_axis(z, axis[..., None], axis=-1)[..., 0] < 0
    action = 2 * axis + sign_negative.astype(np.int64)
    dist = np.linalg.norm(z, axis=-1)
    hold = dist <= HOLD_RADIUS
    if quality is not None:
        hold &= (np.asarray(quality) >= QUALITY_GOOD) | (dist <= HOLD_RADIUS_MIN)
    return np.where(hold, HOLD, action)


def action_delta(action: int | str, step: float = 1.0) -> np.ndarray:
    """Pose change [5] of one movement `action`, `step` normalized units long (HOLD -> zeros)."""
    if isinstance(action, str) and action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
    a = ACTIONS.index(action) if isinstance(action, str) else int(action)
    if not 0 <= a < len(ACTIONS):
        raise ValueError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
    delta = np.zeros(len(POSE_AXES))
    if a != HOLD:
        delta[a // 2] = (1.0 if a % 2 == 0 else -1.0) * step * POSE_SCALE[a // 2]
    return delta

# Model contract (DESIGN.md): one input, four named outputs, in this order.
INPUT_NAME = "image"                      # float32 [B, 1, H, W], see devices.preprocess
OUTPUT_NAMES: tuple[str, ...] = (
    "view_logits",    # [B, V+1]  order VIEW_LABELS
    "quality",        # [B, V]    0..1, image quality as each target view
    "action_logits",  # [B, V, A] best action toward each target view, order ACTIONS
    "pose_offset",    # [B, V, 5] target - current, order POSE_AXES, in POSE_SCALE units (normalized)
)
