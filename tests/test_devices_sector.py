"""Sector detector on synthetic scanner screens (fan of speckle + text, ruler, icons, ECG sweep)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from devices.bench import scanner_screen
from devices.sector import SectorCropper, detect_sector, mask_iou


def _screens(n, start=0, **kw):
    out = [scanner_screen((start + i) / 30.0, **kw) for i in range(n)]
    return [o[0] for o in out], out[0][1]


def test_detects_the_fan_among_ui_clutter():
    frames, truth = _screens(6)
    geo = detect_sector(frames)
    assert geo is not None
    assert abs(geo.apex_x - truth.apex_x) <= 3 and abs(geo.apex_y - truth.apex_y) <= 3
    assert geo.radius_px == pytest.approx(truth.radius_px, rel=0.02)
    assert geo.left_deg == pytest.approx(truth.left_deg, abs=1.5)
    assert geo.right_deg == pytest.approx(truth.right_deg, abs=1.5)
    assert mask_iou(geo.mask(), truth.mask()) >= 0.97


def test_single_frame_falls_back_to_texture():
    frames, truth = _screens(1)
    geo = detect_sector(frames[0])
    assert geo is not None and mask_iou(geo.mask(), truth.mask()) >= 0.9


def test_frozen_ui_without_fan_finds_nothing():
    frame, _ = scanner_screen(0.0)
    ui_only = frame.copy()
    ui_only[:, :, :][np.all(frame == frame[..., :1], axis=2)] = 0  # drop the gray fan, keep coloured UI
    assert detect_sector([ui_only] * 4) is None


@settings(max_examples=6, deadline=None)
@given(apex_x=st.floats(260, 380), apex_y=st.floats(30, 70), radius=st.floats(220, 330),
       sector=st.floats(50, 95), curved=st.booleans())
def test_random_fan_geometries(apex_x, apex_y, radius, sector, curved):
    radius = min(radius, 410 - apex_y)  # keep the fan above the ECG strip
    inner = 0.3 * radius if curved else 0.0
    if curved:
        apex_y -= 0.6 * inner  # curved arrays: virtual apex above the screen, top arc inside it
    frames = [scanner_screen(i / 30.0, apex_xy=(apex_x, apex_y), radius_px=radius, sector_deg=sector,
                             inner_radius_px=inner)[0] for i in range(4)]
    truth = scanner_screen(0.0, apex_xy=(apex_x, apex_y), radius_px=radius, sector_deg=sector,
                           inner_radius_px=inner)[1]
    geo = detect_sector(frames)
    assert geo is not None
    assert mask_iou(geo.mask(), truth.mask()) >= 0.93
    assert geo.sector_deg == pytest.approx(sector, abs=3.0)


def test_cropper_is_stable_and_masks_the_ui():
    frames, truth = _screens(45)
    cropper = SectorCropper(check_every=10)
    outputs = [cropper(f) for f in frames]
    assert cropper.detections == 1 and cropper.checks >= 4
    shapes = {o.shape for o in outputs[cropper.min_frames:]}
    assert len(shapes) == 1
    x0, y0, x1, y1 = cropper.geometry.bbox
    fan = truth.mask()[y0:y1, x0:x1]
    k = np.ones((7, 7), np.uint8)  # allow a 3 px disagreement at the border
    ring = cv2.dilate(fan.astype(np.uint8), k).astype(bool) & ~cv2.erode(fan.astype(np.uint8), k).astype(bool)
    outside = ~fan & ~ring
    assert outputs[-1][outside].max() == 0, "text, ruler, marker or ECG leaked into the crop"
    gray = frames[-1][..., 1][y0:y1, x0:x1]
    assert np.array_equal(outputs[-1][fan & ~ring], gray[fan & ~ring])


def test_cropper_follows_a_depth_change_and_ignores_blank_frames():
    cropper = SectorCropper(check_every=30)
    for f in _screens(20)[0]:
        cropper(f)
    assert cropper.detections == 1
    blank = np.zeros_like(_screens(1)[0][0])
    for _ in range(6):  # a frozen/black moment must not change the crop (hysteresis)
        cropper(blank)
    assert cropper.detections == 1
    shallow, truth = _screens(25, start=40, radius_px=240.0)
    for f in shallow:
        out = cropper(f)
    assert cropper.detections == 2, "the layout jump was not re-detected"
    assert cropper.geometry.radius_px == pytest.approx(240.0, rel=0.03)
    assert out.shape[0] == pytest.approx(truth.bbox[3] - truth.bbox[1], abs=6)


def test_input_validation():
    with pytest.raises(ValueError):
        detect_sector([])
    with pytest.raises(ValueError, match="one size"):
        detect_sector([np.zeros((10, 10), np.uint8), np.zeros((12, 10), np.uint8)])
    with pytest.raises(ValueError):
        SectorCropper(history=1)
