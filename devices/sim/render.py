"""B-mode rendering of the simulated patient along the real sector geometry.

Pipeline per frame (polar domain: n_lines x n_samples, so shadows and blur run along lines):
  1. the image plane cuts every anatomy quadric in a conic; per scan line each convex region is an
     interval of range, solved in closed form; layers (intersections of regions) are painted in
     priority order into a label map; ribs are tested on the near samples only;
  2. tissue echogenicity from the label, thin bright valve leaflets drawn as segments;
  3. speckle: a fixed 3D complex random field (smoothed at the resolution cell, periodic, shifted
     per patient) sampled at the 3D point of every sample, so speckle is attached to the tissue;
  4. point-spread blur (axial finer than lateral, lateral constant in angle so it grows with depth),
     envelope;
  5. attenuation accumulated along each line (bone and air: shadows), time-gain compensation,
     lung reverberation (A-lines), near-field clutter;
  6. log compression with gain and dynamic range, scan conversion with precomputed cv2.remap maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from devices.sim.anatomy import ATTEN_DB_CM_MHZ, CLASS, ECHO, VALVE_ECHO, Anatomy
from devices.sim.pose import probe_axes

_REF_DB = 13.0       # amplitude (dB re 1) shown as white at 0 dB gain
_FIELD_N = 128       # speckle field cells per side (power of two)
_FIELD_CELL_MM = 0.5
_FIELD_SIGMA_MM = 0.6
# Electronic (thermal) noise of the receive chain, grey levels (sd) on the log-compressed polar image.
# A live probe's image is never bit-identical from frame to frame, even over lung or a still heart;
# without it a probe held over a fully shadowed window would look like a frozen scanner to the app.
_THERMAL_NOISE_GREY = 2.0
_NOISE_FIELDS = 8    # precomputed noise fields, one picked per frame time (drawing fresh noise cost 8 % of a render)
_COARSE = (24, 48)   # (lines, samples) of the fixed grid that computes the acoustic factor
_APERTURE_MM = 20.0  # near-field beam spread model for rib shadows (see _add_ribs)
_BLOCKERS = (CLASS["bone"], CLASS["lung"], CLASS["outside"])


@dataclass(frozen=True)
class ScanSettings:
    """Scanner settings of the simulated phased-array probe (one visible config, units in names).

    Attributes:
        depth_mm: imaging depth (cardiac presets 120-200 mm).
        sector_deg: sector opening angle (75-90 on cardiac probes).
        size_px: output image side (square, the sector fits inside with its apex at top centre).
        n_lines: scan lines; 0 = automatic (0.7 x size_px; lateral resolution is coarser than a pixel).
        n_samples: samples per line; 0 = automatic (0.8 x size_px, about one per output row).
        gain_db: overall gain (0 = well set).
        dynamic_range_db: log-compression range (50-70 typical).
        frequency_mhz: centre frequency: attenuation and resolution scale with it.
        tgc_db_cm_mhz: attenuation the time-gain compensation assumes (the patient's may differ).
        clutter: near-field clutter / reverberation level (0 = none, 1 = typical).
    """

    depth_mm: float = 160.0
    sector_deg: float = 80.0
    size_px: int = 128
    n_lines: int = 0
    n_samples: int = 0
    gain_db: float = 0.0
    dynamic_range_db: float = 60.0
    frequency_mhz: float = 3.0
    tgc_db_cm_mhz: float = 0.5
    clutter: float = 1.0

    def __post_init__(self) -> None:
        limits = {
            "depth_mm": (40.0, 300.0), "sector_deg": (20.0, 120.0), "size_px": (32, 1024),
            "n_lines": (0, 2048), "n_samples": (0, 4096), "gain_db": (-40.0, 40.0),
            "dynamic_range_db": (20.0, 100.0), "frequency_mhz": (1.0, 10.0),
            "tgc_db_cm_mhz": (0.0, 2.0), "clutter": (0.0, 5.0),
        }
        for f in fields(self):
            v = getattr(self, f.name)
            lo, hi = limits[f.name]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"ScanSettings.{f.name} must be a number, got {v!r}")
            if f.name in ("size_px", "n_lines", "n_samples") and int(v) != v:
                raise ValueError(f"ScanSettings.{f.name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"ScanSettings.{f.name}={v} is out of range [{lo}, {hi}]")
        if 0 < self.n_lines < 8 or 0 < self.n_samples < 16:
            raise ValueError(f"ScanSettings needs n_lines >= 8 and n_samples >= 16 (or 0 for automatic), "
                             f"got {self.n_lines} and {self.n_samples}")

    @property
    def lines(self) -> int:
        return int(self.n_lines) or max(16, int(round(0.7 * self.size_px)))

    @property
    def samples(self) -> int:
        return int(self.n_samples) or max(32, int(round(0.8 * self.size_px)))

    @property
    def mm_per_px(self) -> float:
        half = math.radians(self.sector_deg / 2.0)
        width = 2.0 * self.depth_mm * math.sin(min(half, math.pi / 2))
        return max(self.depth_mm, width) / self.size_px

    def with_(self, **changes: Any) -> "ScanSettings":
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)


_FIELD: np.ndarray | None = None


def speckle_field() -> np.ndarray:
    """The shared periodic 3D complex scatterer field (unit RMS), built once per process (~16 MB)."""
    global _FIELD
    if _FIELD is None:
        n = _FIELD_N
        rng = np.random.default_rng(20240521)
        white = (rng.standard_normal((n, n, n), dtype=np.float32)
                 + 1j * rng.standard_normal((n, n, n), dtype=np.float32))
        k = np.fft.fftfreq(n).astype(np.float32)
        s = _FIELD_SIGMA_MM / _FIELD_CELL_MM
        g = np.exp(-2.0 * (np.pi * s * k) ** 2).astype(np.float32)
        spec = np.fft.fftn(white) * (g[:, None, None] * g[None, :, None] * g[None, None, :])
        f = np.fft.ifftn(spec).astype(np.complex64)
        f /= np.sqrt(np.mean(np.abs(f) ** 2))
        _FIELD = f.reshape(-1)
    return _FIELD


class _Grid:
    """Polar sample grid of one settings: line angles, sample ranges."""

    def __init__(self, settings: ScanSettings, n_lines: int, n_samples: int) -> None:
        half = math.radians(settings.sector_deg / 2.0)
        self.n_lines, self.n_samples = n_lines, n_samples
        self.dtheta = 2.0 * half / n_lines
        self.theta = -half + (np.arange(n_lines) + 0.5) * self.dtheta
        self.half = half
        self.dr = settings.depth_mm / n_samples
        self.r = ((np.arange(n_samples) + 0.5) * self.dr).astype(np.float32)
        self.sin = np.sin(self.theta)
        self.cos = np.cos(self.theta)
        self.abasis = np.stack([self.sin ** 2, 2.0 * self.sin * self.cos, self.cos ** 2])  # [3, L]
        self.bbasis = 2.0 * np.stack([self.sin, self.cos])                                # [2, L]
        self.j = np.arange(n_samples, dtype=np.int16)[None, :]


class Renderer:
    """Renders one patient with one ScanSettings; all fixed maps are precomputed here."""

    def __init__(self, anatomy: Anatomy, settings: ScanSettings, speckle_offset_mm: np.ndarray) -> None:
        self.anatomy = anatomy
        self.settings = s = settings
        self.grid = g = _Grid(s, s.lines, s.samples)
        self.coarse = _Grid(s, *_COARSE)
        # A sonographer judges the structures in the middle of the sector: rib shadows at its edges
        # (usual in PSAX, whose plane crosses the ribs) cost little, a shadow on the centre line a lot.
        self.line_weight = np.cos(0.5 * np.pi * self.coarse.theta / self.coarse.half)          # [L]
        # both grids' lines solved together: [full lines | coarse lines]
        self.abasis = np.concatenate([g.abasis, self.coarse.abasis], axis=1)
        self.bbasis = np.concatenate([g.bbasis, self.coarse.bbasis], axis=1)
        layers = anatomy.layers
        n_layers = len(layers)
        self.n_layers = n_layers
        q0 = anatomy.quadrics[0]
        k_rows = q0.shape[0]
        kinds = []
        for q in q0:
            a = q[:3, :3]
            if not a.any():
                kinds.append("linear")
            elif np.linalg.eigvalsh(a).min() >= -1e-12:
                kinds.append("convex")
            else:
                kinds.append("concave")
        self.rows_convex = np.array([i for i, k in enumerate(kinds) if k == "convex"])
        self.rows_linear = np.array([i for i, k in enumerate(kinds) if k == "linear"])
        self.rows_concave = np.array([i for i, k in enumerate(kinds) if k == "concave"])
        width = max(len(l.rows) for l in layers)
        idx = np.full((n_layers, width), k_rows, dtype=np.int64)  # row K = "everywhere"
        for i, l in enumerate(layers):
            idx[i, :len(l.rows)] = l.rows
        self.layer_rows = idx
        self.k_rows = k_rows
        self.muscle_layer = [l.name for l in layers].index("muscle")
        cls = np.array([l.cls for l in layers] + [CLASS["lung"], CLASS["bone"]], dtype=np.int64)
        self.LUNG_ID, self.RIB_ID = n_layers, n_layers + 1
        pt = anatomy.patient
        self.layer_echo = ECHO[cls].astype(np.float32)
        blockers = np.isin(cls, _BLOCKERS)
        scale = np.where(blockers, 1.0, pt.atten_scale)
        self.layer_db = (ATTEN_DB_CM_MHZ[cls] * scale * s.frequency_mhz * (g.dr / 10.0) * 2.0).astype(np.float32)
        self.layer_heart = np.array([l.heart for l in layers] + [False, False])
        self.layer_blocker = blockers
        self.layer_is_lung = cls == CLASS["lung"]
        ln10_20 = math.log(10.0) / 20.0
        self.ln10_20 = np.float32(ln10_20)
        # TGC: the nominal round-trip loss, in natural-log amplitude units per sample
        self.tgc = (2.0 * s.tgc_db_cm_mhz * s.frequency_mhz * g.r / 10.0 * ln10_20).astype(np.float32)
        # PSF in grid units: axial ~0.55 mm and lateral ~0.6 deg at 3 MHz (finer at higher frequency)
        self.sigma_axial = max(0.3, 0.55 * 3.0 / s.frequency_mhz / g.dr)
        self.sigma_lateral = max(0.3, math.radians(0.6 * 3.0 / s.frequency_mhz) / g.dtheta)
        # near-field clutter: a haze fixed to the probe (it does not move with the tissue)
        rng = np.random.default_rng(7)
        haze = np.abs(rng.standard_normal((g.n_lines, g.n_samples)) + 1j * rng.standard_normal((g.n_lines, g.n_samples)))
        haze = cv2.GaussianBlur(haze.astype(np.float32), (0, 0), sigmaX=max(0.5, 1.0 / g.dr), sigmaY=1.5)
        self.clutter = (s.clutter * 0.1 * np.exp(-g.r / 12.0)[None, :] * haze + 1e-4).astype(np.float32)
        self.noise = (rng.standard_normal((_NOISE_FIELDS, g.n_lines, g.n_samples)) * _THERMAL_NOISE_GREY).astype(np.float32)
        self.field = speckle_field()
        self.field_offset = (np.asarray(speckle_offset_mm, dtype=np.float64) / _FIELD_CELL_MM + 2 ** 16)
        self._maps = self._scan_conversion_maps()
        self.log_scale = np.float32(255.0 / s.dynamic_range_db / ln10_20)
        self.log_offset = np.float32((s.gain_db - _REF_DB + s.dynamic_range_db) * 255.0 / s.dynamic_range_db)
        self.r32 = g.r.astype(np.float32)
        # one label pass for both grids: per-line sample spacing and count
        c = self.coarse
        self._dr_lines = np.concatenate([np.full(g.n_lines, g.dr), np.full(c.n_lines, c.dr)])[None, :]
        self._ns_lines = np.concatenate([np.full(g.n_lines, g.n_samples), np.full(c.n_lines, c.n_samples)])[None, :]
        self._n_total = max(g.n_samples, c.n_samples)

    # ------------------------------------------------------------------------------ geometry
    def _scan_conversion_maps(self) -> tuple[np.ndarray, np.ndarray]:
        s, g = self.settings, self.grid
        n = s.size_px
        scale = s.mm_per_px
        jj, ii = np.meshgrid(np.arange(n), np.arange(n))
        x = (jj + 0.5 - n / 2.0) * scale
        y = (ii + 0.5) * scale
        r = np.hypot(x, y)
        th = np.arctan2(x, y)
        col = r / g.dr - 0.5
        row = (th + g.half) / g.dtheta - 0.5
        outside = (r > s.depth_mm) | (np.abs(th) > g.half)
        col[outside] = -10.0
        row[outside] = -10.0
        return cv2.convertMaps(col.astype(np.float32), row.astype(np.float32), cv2.CV_16SC2)

    def plane_coefficients(self, pose: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, R, M): probe point, axes, and per-quadric conic coefficients [K, 3, 3] in the plane."""
        p, rot = probe_axes(pose, self.anatomy.chest_radius_mm)
        q = self.anatomy.quadrics_at(t)
        basis = np.zeros((3, 4))
        basis[0, :3] = rot[:, 0]
        basis[1, :3] = rot[:, 2]
        basis[2, :3] = p
        basis[2, 3] = 1.0
        m = np.einsum("ia,kab,jb->kij", basis, q, basis, optimize=False)
        return p, rot, m

    def _intervals_mm(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per layer and line (full then coarse lines), the range interval [lo, hi) in mm inside it.

        Along a line f(r) = a r^2 + b r + c; convex rows are inside between the roots, linear rows
        on one side of their root, concave rows (skin bands) on the side of the probe (first run).
        """
        n_lines = self.abasis.shape[1]
        lo = np.empty((self.k_rows + 1, n_lines))
        hi = np.empty((self.k_rows + 1, n_lines))
        lo[-1], hi[-1] = -np.inf, np.inf
        coef_a = np.stack([m[:, 0, 0], m[:, 0, 1], m[:, 1, 1]], axis=1)
        coef_b = np.stack([m[:, 0, 2], m[:, 1, 2]], axis=1)
        c_all = m[:, 2, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            rc = self.rows_convex
            a = np.maximum(coef_a[rc] @ self.abasis, 1e-12)
            b = coef_b[rc] @ self.bbasis
            c = c_all[rc][:, None]
            disc = b * b - 4.0 * a * c
            sq = np.sqrt(np.maximum(disc, 0.0))
            qq = -0.5 * (b + np.copysign(sq, b))
            r1, r2 = qq / a, c / qq
            ok = disc > 0
            lo[rc] = np.where(ok, np.minimum(r1, r2), np.inf)
            hi[rc] = np.where(ok, np.maximum(r1, r2), -np.inf)
            rl = self.rows_linear
            if rl.size:
                b = coef_b[rl] @ self.bbasis
                root = -c_all[rl][:, None] / b
                lo[rl] = np.where(b < 0, root, -np.inf)
                hi[rl] = np.where(b > 0, root, np.inf)
            rn = self.rows_concave
            if rn.size:
                a = np.minimum(coef_a[rn] @ self.abasis, -1e-12)
                b = coef_b[rn] @ self.bbasis
                c = c_all[rn][:, None]
                disc = b * b - 4.0 * a * c
                sq = np.sqrt(np.maximum(disc, 0.0))
                qq = -0.5 * (b + np.copysign(sq, b))
                r1, r2 = qq / a, c / qq
                ra, rb = np.minimum(r1, r2), np.maximum(r1, r2)
                ok = disc > 0
                first = ra > 0
                lo[rn] = np.where(ok & ~first, rb, -np.inf)
                hi[rn] = np.where(ok & first, ra, np.inf)
        return lo[self.layer_rows].max(axis=1), hi[self.layer_rows].min(axis=1)

    def _label_map(self, lo_mm: np.ndarray, hi_mm: np.ndarray, dr, ns, n_total: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer id per sample [L, n_total] (first layer in priority order whose interval holds it).

        Works on intervals: per line, the sorted interval ends cut the line into runs, each run gets
        the first layer covering it, and np.repeat expands runs to samples. `dr` and `ns` (sample
        spacing and count) are scalars or per-line rows [1, L], so two grids can share one call.
        Returns the labels and, per line, the sample index where the chest wall ends.
        """
        lo = np.clip(np.ceil(np.clip(lo_mm / dr - 0.5, -1.0, n_total + 1.0)), 0, ns).astype(np.int16)
        hi = np.clip(np.ceil(np.clip(hi_mm / dr - 0.5, -1.0, n_total + 1.0)), 0, ns).astype(np.int16)
        n_lines = lo.shape[1]
        active = np.flatnonzero((hi > lo).any(axis=1))
        ids = np.append(active, self.LUNG_ID).astype(np.uint8)
        lo_t = np.zeros((n_lines, active.size + 1), np.int16)
        hi_t = np.full((n_lines, active.size + 1), n_total, np.int16)
        lo_t[:, :-1] = lo[active].T
        hi_t[:, :-1] = hi[active].T
        bp = np.concatenate([lo_t, hi_t], axis=1)          # includes 0 and n_total from the lung sentinel
        bp.sort(axis=1)
        starts = bp[:, :-1]
        cover = (lo_t[:, None, :] <= starts[:, :, None]) & (hi_t[:, None, :] > starts[:, :, None])
        run_label = ids[np.argmax(cover, axis=2)]
        lengths = np.diff(bp, axis=1).ravel().astype(np.intp)
        return np.repeat(run_label.ravel(), lengths).reshape(n_lines, n_total), hi[self.muscle_layer]

    def _positions(self, p: np.ndarray, rot: np.ndarray, g: _Grid) -> tuple[np.ndarray, ...]:
        """3D positions (x, y, z) [L, S] float32 of the samples of a grid."""
        d = (np.outer(g.sin, rot[:, 0]) + np.outer(g.cos, rot[:, 2])).astype(np.float32)   # [L, 3]
        r = g.r
        return tuple(np.float32(p[k]) + d[:, k:k + 1] * r[None, :] for k in range(3))

    def _rib_points(self, wall_end: np.ndarray, p: np.ndarray, rot: np.ndarray, g: _Grid):
        """Positions (x, y, z) [L, jm] of the samples inside the chest wall, for the rib test.

        Aperture model: near the face every line's beam is as wide as the ~2 cm array, so what a rib
        blocks depends on the beam centre, which spreads from the aperture rather than from a point:
        the lateral offset used for the rib test is r sin(theta) * r / (r + _APERTURE_MM).
        """
        jm = min(int(wall_end.max()) + 1, g.n_samples)
        r = g.r[:jm]
        lat = (np.outer(g.sin, r * r / (r + _APERTURE_MM))).astype(np.float32)       # [L, jm]
        ax = (np.outer(g.cos, r)).astype(np.float32)
        u, w = rot[:, 0].astype(np.float32), rot[:, 2].astype(np.float32)
        return tuple(np.float32(p[k]) + lat * u[k] + ax * w[k] for k in range(3))

    def _add_ribs(self, labels: list[np.ndarray], wall_ends: list[np.ndarray], p: np.ndarray, rot: np.ndarray,
                  grids: list[_Grid]) -> None:
        """Paint rib bone into the label maps of one or more grids (one rib test for all of them)."""
        pts = [self._rib_points(we, p, rot, g) for we, g in zip(wall_ends, grids)]
        flat = [np.concatenate([q[k].ravel() for q in pts]) for k in range(3)]
        mask = self.anatomy.ribs_mask(*flat)
        start = 0
        for lab, q in zip(labels, pts):
            n = q[0].size
            if n:
                sub = mask[start:start + n].reshape(q[0].shape)
                lab[:, :q[0].shape[1]][sub] = self.RIB_ID
            start += n

    def _visible_fraction(self, label: np.ndarray) -> float:
        """Share of the heart in a coarse label map not behind bone or air, lines weighted by line_weight."""
        heart = self.layer_heart[label]
        n_heart = float(heart.sum(axis=1) @ self.line_weight)
        if n_heart == 0.0:
            return 0.0
        blocked = np.zeros(label.shape, dtype=bool)
        blocked[:, 1:] = np.logical_or.accumulate(self.layer_blocker[label[:, :-1]], axis=1)
        return float((heart & ~blocked).sum(axis=1) @ self.line_weight) / n_heart

    def _coarse_visible(self, p, rot, lo_mm, hi_mm) -> float:
        g = self.coarse
        nf = self.grid.n_lines
        label, wall_end = self._label_map(lo_mm[:, nf:], hi_mm[:, nf:], g.dr, g.n_samples, g.n_samples)
        self._add_ribs([label], [wall_end], p, rot, [g])
        return self._visible_fraction(label)

    # ------------------------------------------------------------------------------ acoustic
    def visible_heart_fraction(self, pose: np.ndarray, t: float) -> float:
        """Fraction of the heart in the sector that is not behind bone or air (fixed coarse grid)."""
        p, rot, m = self.plane_coefficients(pose, t)
        lo_mm, hi_mm = self._intervals_mm(m)
        return self._coarse_visible(p, rot, lo_mm, hi_mm)

    def _both_label_maps(self, p, rot, m) -> tuple[np.ndarray, np.ndarray]:
        """Label maps of the full grid [L, S] and of the coarse grid, ribs included, in one pass."""
        g, c = self.grid, self.coarse
        nf = g.n_lines
        lo_mm, hi_mm = self._intervals_mm(m)
        lab, wall_end = self._label_map(lo_mm, hi_mm, self._dr_lines, self._ns_lines, self._n_total)
        full = lab[:nf, :g.n_samples]
        coarse = lab[nf:, :c.n_samples]
        self._add_ribs([full, coarse], [wall_end[:nf], wall_end[nf:]], p, rot, [g, c])
        return full, coarse

    def label_map(self, pose: np.ndarray, t: float) -> np.ndarray:
        """Layer id per polar sample [n_lines, n_samples] of the full grid (for debugging / masks)."""
        return self._both_label_maps(*self.plane_coefficients(pose, t))[0]

    # ------------------------------------------------------------------------------ imaging
    def render(self, pose: np.ndarray, t: float) -> tuple[np.ndarray, float]:
        """uint8 [size, size] B-mode image and the visible heart fraction at pose and time t."""
        p, rot, m = self.plane_coefficients(pose, t)
        label, coarse = self._both_label_maps(p, rot, m)
        visible = self._visible_fraction(coarse)
        g = self.grid
        x, y, z = self._positions(p, rot, g)
        echo = self.layer_echo.take(label)
        self._draw_valves(echo, p, rot, t)
        # speckle attached to the tissue: nearest cell of the periodic field at each 3D point
        inv = np.float32(1.0 / _FIELD_CELL_MM)
        msk = _FIELD_N - 1
        off = self.field_offset.astype(np.float32)
        ix = (x * inv + off[0]).astype(np.int32)
        iy = (y * inv + off[1]).astype(np.int32)
        iz = (z * inv + off[2]).astype(np.int32)
        ix &= msk
        iy &= msk
        iz &= msk
        ix <<= 14
        iy <<= 7
        ix |= iy
        ix |= iz
        sc = self.field.take(ix)
        sc *= echo
        rf = cv2.GaussianBlur(sc.view(np.float32), (0, 0), sigmaX=self.sigma_axial, sigmaY=self.sigma_lateral)
        env = np.abs(rf.view(np.complex64))
        # attenuation along each line (exclusive cumulative sum: a surface is seen, then shadows)
        db = self.layer_db.take(label)
        loss = np.cumsum(db, axis=1, dtype=np.float32)
        loss -= db
        loss *= self.ln10_20
        expo = self.tgc - loss
        np.minimum(expo, 30.0, out=expo)
        lin = env * cv2.exp(expo)
        self._reverberation(lin, label)
        lin += self.clutter
        img = cv2.log(lin)
        img *= self.log_scale
        img += self.log_offset
        # a noise field picked by a hash of the frame time: same pose and t -> same image, and
        # consecutive frames (any frame rate) mostly get different fields
        img += self.noise[((int(round(float(t) * 1e3)) * 0x9E3779B1) >> 13) % _NOISE_FIELDS]
        np.clip(img, 0.0, 255.0, out=img)
        polar = img.astype(np.uint8)
        out = cv2.remap(polar, self._maps[0], self._maps[1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out, visible

    def _reverberation(self, lin: np.ndarray, label: np.ndarray) -> None:
        """A-lines: repeats of the pleural line at multiples of its depth, on lines that reach lung."""
        lung = self.layer_is_lung[label]
        has = lung.any(axis=1)
        if not has.any():
            return
        g = self.grid
        rows = np.flatnonzero(has)
        jl = lung[rows].argmax(axis=1)
        amp = lin[rows, jl]
        rp = g.r[jl]
        keep = rp > 6.0
        if not keep.any():
            return
        rows, amp, rp = rows[keep], amp[keep], rp[keep]
        m = g.r[None, :] / rp[:, None]
        k = np.rint(m)
        frac = (m - k) * rp[:, None]
        pat = np.exp(-(frac / 1.3) ** 2 - 0.8 * (k - 1.0)) * (k >= 2)
        lin[rows] += (0.5 * amp[:, None] * pat).astype(np.float32)

    def _draw_valves(self, echo: np.ndarray, p: np.ndarray, rot: np.ndarray, t: float) -> None:
        """Valve leaflets as thin bright segments where the image plane cuts the annulus."""
        g = self.grid
        an = self.anatomy
        n = rot[:, 1]
        centers, angles = an.valve_state(t)                                   # [V, 3], [V]
        delta = (centers - p) @ n                                             # [V]
        a_ = an.valve_e1 @ n
        b_ = an.valve_e2 @ n
        amp = np.hypot(a_, b_) * an.valve_radius
        cut = np.abs(delta) < amp * 0.999
        if not cut.any():
            return
        v = np.flatnonzero(cut)
        beta0 = np.arctan2(b_[v], a_[v])
        half = np.arccos(-delta[v] / amp[v])
        betas = np.stack([beta0 + half, beta0 - half], axis=1)               # [v, 2]
        e1, e2, ax = an.valve_e1[v], an.valve_e2[v], an.valve_axis[v]
        rad = an.valve_radius[v][:, None, None]
        hinge = centers[v][:, None, :] + rad * (np.cos(betas)[..., None] * e1[:, None, :]
                                                + np.sin(betas)[..., None] * e2[:, None, :])  # [v, 2, 3]
        th = np.radians(angles[v])[:, None, None]
        gdir = np.cos(th) * (centers[v][:, None, :] - hinge) / rad + np.sin(th) * ax[:, None, :]
        ts = np.array([0.0, 0.5, 1.0])
        pts = hinge[:, :, None, :] + (an.valve_leaflet[v][:, None, None, None] * ts[None, None, :, None]) * gdir[:, :, None, :]
        rel = (pts - p) @ rot                                                  # [v, 2, 3 pts, (u, n, w)]
        fade = np.exp(-(np.abs(rel[..., 1]).mean(axis=2) / 4.0) ** 2) * VALVE_ECHO   # [v, 2]
        rr = np.hypot(rel[..., 0], rel[..., 2])
        tt = np.arctan2(rel[..., 0], rel[..., 2])
        poly = np.round(np.stack([rr / g.dr - 0.5, (tt + g.half) / g.dtheta - 0.5], axis=-1) * 8.0).astype(np.int32)
        thick = max(1, int(round(1.2 / g.dr)))
        for i in range(len(v)):
            for k in range(2):
                cv2.polylines(echo, [poly[i, k]], False, float(fade[i, k]), thickness=thick,
                              lineType=cv2.LINE_8, shift=3)
