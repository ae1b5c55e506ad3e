"""Find the ultrasound fan on a scanner screen capture, crop to it and blank everything else.

A screen capture (HDMI grabber, `video:0` on a capture card) carries the vendor UI around the
image: text (preset, MI/TI, frame rate), a depth ruler, icons, a marker dot and often an ECG trace.
The model must see only the fan. Two cues find it:

1. Temporal variation: speckle inside the fan changes from frame to frame while the UI is static,
   so the per-pixel standard deviation over a few frames lights up the fan (and the thin ECG sweep,
   which a morphological opening removes). With a single frame, or a frozen image, local texture
   (speckle) plus brightness is used instead.
2. Geometry: the largest connected region is filled (convex hull: a sector narrower than 180 deg
   is convex, so dark cavities touching the border do not notch it), its two straight side edges
   are fitted row by row and meet at the apex (virtual apex above the image for curved arrays),
   and the radii are percentiles of the distance to the apex.

`SectorCropper` keeps the result stable from frame to frame: it re-checks the layout every
`check_every` frames, or at once when the mean brightness inside or outside the fan jumps (depth or
mode change), and adopts a new geometry only after `confirm` consecutive detections agree
(hysteresis), so one bad detection never makes the crop jump.

Conventions: pixel coordinates (x right, y down); angles in degrees from straight down, negative
toward the screen left; the apex may lie above the image (negative y).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

# Detection works on a copy at most this many pixels on its longer side (speed); the geometry is
# scaled back to full resolution.
WORK_SIZE_PX = 480


@dataclass(frozen=True)
class SectorGeometry:
    """A fan on the screen, in full-resolution pixel coordinates.

    Attributes:
        apex_x: apex column (px).
        apex_y: apex row (px); may be negative (virtual apex of a curved array).
        radius_px: outer radius (the imaging depth on screen).
        inner_radius_px: inner radius (0 for a phased array's point apex, > 0 for curved arrays).
        left_deg: angle of the left edge from straight down (negative to the left).
        right_deg: angle of the right edge from straight down.
        frame_shape: (height, width) of the screen the fan was found on.
    """

    apex_x: float
    apex_y: float
    radius_px: float
    inner_radius_px: float
    left_deg: float
    right_deg: float
    frame_shape: tuple[int, int]

    @property
    def sector_deg(self) -> float:
        """Opening angle of the fan."""
        return self.right_deg - self.left_deg

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive, of the fan clipped to the frame."""
        ys, xs = self._outline()
        h, w = self.frame_shape
        x0 = int(np.clip(math.floor(xs.min()), 0, w - 1))
        x1 = int(np.clip(math.ceil(xs.max()) + 1, x0 + 1, w))
        y0 = int(np.clip(math.floor(ys.min()), 0, h - 1))
        y1 = int(np.clip(math.ceil(ys.max()) + 1, y0 + 1, h))
        return x0, y0, x1, y1

    def _outline(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of points on the fan's border (arcs and edges)."""
        angles = np.radians(np.linspace(self.left_deg, self.right_deg, 64))
        pts_r = np.concatenate([np.full(64, self.radius_px), np.full(64, self.inner_radius_px)])
        pts_a = np.concatenate([angles, angles])
        xs = self.apex_x + pts_r * np.sin(pts_a)
        ys = self.apex_y + pts_r * np.cos(pts_a)
        return ys, xs

    def mask(self, shape: tuple[int, int] | None = None, scale: float = 1.0,
             origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Boolean [H, W] mask of the fan.

        Args:
            shape: output shape; defaults to `frame_shape` (scaled by `scale`).
            scale: draw the fan scaled by this factor (for the detector's reduced copy).
            origin: (x, y) of the output's top-left pixel in the (scaled) frame, to draw a window.
        """
        if shape is None:
            shape = (round(self.frame_shape[0] * scale), round(self.frame_shape[1] * scale))
        h, w = shape
        xs = np.arange(origin[0], origin[0] + w, dtype=np.float32)[None, :]
        ys = np.arange(origin[1], origin[1] + h, dtype=np.float32)[:, None]
        dx = xs - np.float32(self.apex_x * scale)
        dy = ys - np.float32(self.apex_y * scale)
        r = np.sqrt(dx * dx + dy * dy)
        ang = np.degrees(np.arctan2(dx, dy))
        return ((r <= self.radius_px * scale) & (r >= self.inner_radius_px * scale)
                & (ang >= self.left_deg) & (ang <= self.right_deg))

    def scaled(self, factor: float, frame_shape: tuple[int, int]) -> "SectorGeometry":
        """The same fan on an image `factor` times larger."""
        return SectorGeometry(self.apex_x * factor, self.apex_y * factor, self.radius_px * factor,
                              self.inner_radius_px * factor, self.left_deg, self.right_deg, frame_shape)

    def to_dict(self) -> dict:
        """JSON-friendly summary (pixels and degrees)."""
        return {"apex_x": round(self.apex_x, 2), "apex_y": round(self.apex_y, 2),
                "radius_px": round(self.radius_px, 2), "inner_radius_px": round(self.inner_radius_px, 2),
                "left_deg": round(self.left_deg, 2), "right_deg": round(self.right_deg, 2),
                "sector_deg": round(self.sector_deg, 2), "frame_shape": list(self.frame_shape)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    return image


def _work_scale(shape: tuple[int, int]) -> float:
    return min(1.0, WORK_SIZE_PX / max(shape))


def _shrink(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _live_mask(frames: list[np.ndarray]) -> np.ndarray:
    """Pixels that change over the frames (speckle), or that look like speckle in a single frame."""
    if len(frames) >= 2:
        stack = np.stack(frames).astype(np.float32)  # [K, h, w]
        std = stack.std(axis=0)
        live = std > max(4.0, 0.25 * float(np.percentile(std, 99)))
        if np.count_nonzero(live) > 0.01 * live.size:
            return live
    # Single or frozen frame: speckle is locally textured and not black.
    f = frames[-1].astype(np.float32)
    mean = cv2.blur(f, (7, 7))
    var = cv2.blur(f * f, (7, 7)) - mean * mean
    textured = ((np.sqrt(np.maximum(var, 0)) > 6.0) & (mean > 12.0)).astype(np.uint8)
    return cv2.erode(textured, np.ones((5, 5), np.uint8)).astype(bool)  # undo most of the 7x7 window spread


def _largest_region(live: np.ndarray) -> np.ndarray | None:
    """Fill of the convex hull of the largest region after removing thin structures."""
    m = live.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < 0.01 * m.size:
        return None
    contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    filled = np.zeros_like(m)
    cv2.fillPoly(filled, [hull], 1)
    return filled.astype(bool)


def _fit_edges(rows: np.ndarray, left: np.ndarray, right: np.ndarray, lo: float, hi: float):
    sel = (rows >= lo) & (rows <= hi)
    if np.count_nonzero(sel) < 5:
        return None
    bl, al = np.polyfit(rows[sel], left[sel], 1)   # x = a + b * y
    br, ar = np.polyfit(rows[sel], right[sel], 1)
    if br - bl <= 1e-3:
        return None
    apex_y = (al - ar) / (br - bl)
    return al + bl * apex_y, apex_y, bl, br


def fit_sector(region: np.ndarray) -> SectorGeometry | None:
    """Fit a fan (apex, radii, edge angles) to a filled boolean region.

    Returns None when the region is not fan-shaped (too small, too narrow or too wide, or the fitted
    fan overlaps the region poorly).
    """
    h, w = region.shape
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size < 10:
        return None
    sub = region[rows]
    left = np.argmax(sub, axis=1).astype(np.float64)
    right = (w - 1 - np.argmax(sub[:, ::-1], axis=1)).astype(np.float64)
    top, height = float(rows[0]), float(rows[-1] - rows[0] + 1)
    fit = _fit_edges(rows, left, right, top + 0.08 * height, top + 0.5 * height)
    ys, xs = np.nonzero(region)
    for _ in range(2):  # refit on the straight part of the edges, now that the arc's start is known
        if fit is None:
            return None
        ax, ay, bl, br = fit
        dist = np.hypot(xs - ax, ys - ay)
        radius = float(np.percentile(dist, 99.7))
        half_cos = math.cos(max(abs(math.atan(bl)), abs(math.atan(br))))
        fit = _fit_edges(rows, left, right, top + 0.05 * height, min(ay + 0.92 * radius * half_cos, top + 0.9 * height))
    if fit is None:
        return None
    ax, ay, bl, br = fit
    left_deg, right_deg = math.degrees(math.atan(bl)), math.degrees(math.atan(br))
    dist = np.hypot(xs - ax, ys - ay)
    ang = np.degrees(np.arctan2(xs - ax, ys - ay))
    radius = float(np.percentile(dist, 99.7))
    central = np.abs(ang - 0.5 * (left_deg + right_deg)) < 0.25 * (right_deg - left_deg)
    inner = float(np.percentile(dist[central], 0.5)) if central.any() else 0.0
    if inner < 0.08 * radius:
        inner = 0.0
    geo = SectorGeometry(float(ax), float(ay), radius, inner, left_deg, right_deg, (h, w))
    if not (15.0 <= geo.sector_deg <= 175.0) or radius < 20:
        return None
    if mask_iou(geo.mask((h, w)), region) < 0.8:
        return None
    return geo


def detect_sector(frames: list[np.ndarray] | np.ndarray) -> SectorGeometry | None:
    """Find the fan in one or a few screen frames (gray or BGR uint8, same size).

    Args:
        frames: a single image or a list of consecutive frames (3 to 10 give the best result:
            the fan is where pixels change).

    Returns:
        The fan geometry in the frames' pixel coordinates, or None when no fan is visible.
    """
    if isinstance(frames, np.ndarray) and (frames.ndim == 2 or (frames.ndim == 3 and frames.shape[2] in (3, 4))):
        frames = [frames]  # one gray or BGR image
    grays = [_gray(np.asarray(f)) for f in frames]
    if not grays or grays[0].size == 0:
        raise ValueError("detect_sector needs at least one non-empty frame")
    shape = grays[0].shape
    if any(g.shape != shape for g in grays):
        raise ValueError(f"detect_sector needs frames of one size, got {sorted({g.shape for g in grays})}")
    scale = _work_scale(shape)
    small = [_shrink(g, scale) for g in grays]
    return _detect_small(small, scale, shape)


def _detect_small(small: list[np.ndarray], scale: float, shape: tuple[int, int]) -> SectorGeometry | None:
    region = _largest_region(_live_mask(small))
    if region is None:
        return None
    geo = fit_sector(region)
    return None if geo is None else geo.scaled(1.0 / scale, shape)


class SectorCropper:
    """Crop each screen frame to the fan and blank the outside, with a stable geometry.

    Until a fan is found the full frame is returned unchanged, so the output size changes once,
    when the first detection succeeds (after `min_frames` frames; file sources prime the cropper
    at open so their first frame is already cropped). Cost: ~2 ms a frame at 1920x1080, plus a
    20-50 ms detection at each check.

    Args:
        history: frames kept (at reduced size) for the temporal variation.
        min_frames: frames needed before the first detection.
        check_every: re-check the layout every this many frames.
        change_level: a jump of the mean gray level inside or outside the fan larger than this
            (0-255 scale) triggers a check at once.
        confirm: consecutive agreeing detections needed to adopt a new geometry (hysteresis).
        same_iou: masks overlapping at least this much count as the same geometry.
    """

    def __init__(self, history: int = 8, min_frames: int = 4, check_every: int = 30,
                 change_level: float = 12.0, confirm: int = 2, same_iou: float = 0.9) -> None:
        if history < 2 or not 1 <= min_frames <= history or check_every < 1 or confirm < 1:
            raise ValueError("SectorCropper: need history >= 2, 1 <= min_frames <= history, check_every >= 1, confirm >= 1")
        self.history, self.min_frames, self.check_every = history, min_frames, check_every
        self.change_level, self.confirm, self.same_iou = change_level, confirm, same_iou
        self.geometry: SectorGeometry | None = None
        self.detections = 0      # times a (new) geometry was adopted
        self.checks = 0          # detection attempts
        self._buf: deque[np.ndarray] = deque(maxlen=history)
        self._shape: tuple[int, int] | None = None
        self._scale = 1.0
        self._since_check = 0
        self._pending: list[np.ndarray] = []  # candidate masks awaiting confirmation
        self._small_mask: np.ndarray | None = None
        self._ref_means: tuple[float, float] | None = None
        self._crop: tuple[int, int, int, int] | None = None
        self._crop_mask: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the geometry and the frame history."""
        self.__init__(self.history, self.min_frames, self.check_every, self.change_level, self.confirm, self.same_iou)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Gray uint8 [H, W] screen frame -> uint8 crop of the fan, zero outside it."""
        gray = _gray(image)
        if gray.shape != self._shape:  # new screen size: start over
            self.reset()
            self._shape, self._scale = gray.shape, _work_scale(gray.shape)
        small = _shrink(gray, self._scale)
        self._buf.append(small)
        self._since_check += 1
        if self.geometry is None:
            if len(self._buf) >= self.min_frames and self._since_check >= self.min_frames:
                self._check()  # no fan yet: try every min_frames frames, not every frame
        elif self._layout_jumped(small):
            # Old frames show the old layout: start the history afresh and check once it refills.
            self._buf.clear()
            self._buf.append(small)
            self._ref_means = self._means(small)
            self._since_check = self.check_every - self.min_frames + 1
        elif self._since_check >= self.check_every:
            self._check()
        if self.geometry is None:
            return gray
        x0, y0, x1, y1 = self._crop
        return np.where(self._crop_mask, gray[y0:y1, x0:x1], np.uint8(0))

    def _means(self, small: np.ndarray) -> tuple[float, float]:
        m = self._small_mask
        return float(small[m].mean()), float(small[~m].mean()) if (~m).any() else 0.0

    def _layout_jumped(self, small: np.ndarray) -> bool:
        inside, outside = self._means(small)
        ref_in, ref_out = self._ref_means
        return abs(inside - ref_in) > self.change_level or abs(outside - ref_out) > self.change_level

    def _check(self) -> None:
        self._since_check = 0
        self.checks += 1
        cand = _detect_small(list(self._buf), self._scale, self._shape)
        if self.geometry is not None:
            self._ref_means = self._means(self._buf[-1])  # brightness now checked: new reference
        if cand is None:
            return
        cand_small = cand.mask(self._buf[-1].shape, scale=self._scale)
        if self.geometry is None:
            self._adopt(cand, cand_small)
            return
        if mask_iou(cand_small, self._small_mask) >= self.same_iou:
            self._pending.clear()
            return
        if self._pending and mask_iou(cand_small, self._pending[-1]) < self.same_iou:
            self._pending.clear()
        self._pending.append(cand_small)
        if len(self._pending) >= self.confirm:
            self._adopt(cand, cand_small)
        else:  # confirm on fresh frames soon, not a whole period later
            self._since_check = self.check_every - self.min_frames

    def _adopt(self, geo: SectorGeometry, small_mask: np.ndarray) -> None:
        self.geometry = geo
        self.detections += 1
        self._pending.clear()
        self._small_mask = small_mask
        self._ref_means = self._means(self._buf[-1])
        x0, y0, x1, y1 = geo.bbox
        self._crop = (x0, y0, x1, y1)
        self._crop_mask = geo.mask((y1 - y0, x1 - x0), origin=(x0, y0))
