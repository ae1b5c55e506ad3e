"""Seeded analytic anatomy of one simulated patient: a beating heart in a chest, as quadrics.

Every structure is a convex region {P : [P 1] Q [P 1]^T < 0} (ellipsoid, elliptic cylinder,
paraboloid, half-space) or an intersection of a few of them; a "layer" is such an intersection
with a tissue class, and layers are painted in priority order (first match wins), so the
septum is LV myocardium carved out of the RV ellipsoid, the pericardium is the shell left
between the myocardium and a slightly larger ellipsoid, and so on. Ribs are periodic and are
evaluated apart (`ribs_mask`). Valve leaflets are thin, so the renderer draws them as segments
(`Renderer._draw_valves`). Everything is in the patient frame of devices/sim/pose.py (mm).

Heart frame: a1 = LV long axis (mitral annulus centre -> apex: left, anterior, inferior),
a2 = toward the RV (patient's right and anterior), a3 = a1 x a2 (posterior-inferior).
H(s, t, q) = mitral_centre + s a1 + t a2 + q a3. Sizes follow ECHO_PRIMER.md (ASE ranges).
The heart beats: phase 0 is end-diastole, systole lasts `systole_frac` of the cycle; the LV
shortens (the base descends toward the fixed apex) and narrows to the patient's ejection
fraction, the walls thicken, the atria fill, the valves open and close.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from devices.sim.pose import pose_from_axes, probe_axes, skin_z

N_PHASES = 64  # precomputed cardiac phases; frames interpolate between the two nearest

# Tissue classes: echogenicity (linear amplitude, 1 ~ bright tissue) and attenuation (dB/cm/MHz).
CLASSES: tuple[tuple[str, float, float], ...] = (
    ("lung", 2.6, 400.0),        # air: bright pleura, nothing behind
    ("outside", 0.0, 400.0),     # air above the skin (beam lifted off the body)
    ("bone", 2.4, 150.0),         # rib / sternum cortex: bright then shadow
    ("skin", 0.9, 0.5),
    ("fat", 0.14, 0.5),
    ("muscle", 0.34, 0.7),
    ("blood", 0.006, 0.15),
    ("myocardium", 0.5, 0.6),
    ("thin_wall", 0.6, 0.6),    # RV free wall, atrial walls
    ("vessel_wall", 0.75, 0.6),
    ("pericardium", 2.0, 1.0),
    ("liver", 0.4, 0.5),
    ("diaphragm", 1.4, 0.8),
    ("soft", 0.2, 0.5),         # mediastinal fat / connective tissue
)
CLASS = {name: i for i, (name, _, _) in enumerate(CLASSES)}
ECHO = np.array([c[1] for c in CLASSES], dtype=np.float32)
ATTEN_DB_CM_MHZ = np.array([c[2] for c in CLASSES], dtype=np.float32)
VALVE_ECHO = 1.1


@dataclass(frozen=True)
class Patient:
    """Per-patient parameters, all drawn from the seed by `make_patient`.

    Attributes are physical: sizes in mm, angles in degrees, rates in beats per minute.
    """

    seed: int
    heart_rate_bpm: float
    systole_frac: float
    phase0: float                 # cardiac phase at t = 0
    size: float                   # overall heart scale (1 = average adult)
    lv_length_mm: float           # endocardial base-apex length at end-diastole
    lv_radius_mm: float           # endocardial radius at end-diastole (diameter / 2)
    ejection_fraction: float
    wall_mm: float                # LV wall (septum, posterior wall) at end-diastole
    rv_wall_mm: float
    long_axis: tuple[float, float, float]   # a1 in the patient frame (unit)
    rv_axis: tuple[float, float, float]     # a2 in the patient frame (unit)
    apex_mm: tuple[float, float, float]     # endocardial LV apex in the patient frame
    chest_radius_mm: float        # skin curvature (pose.skin_z)
    fat_mm: float                 # subcutaneous fat (body habitus)
    muscle_mm: float              # chest/abdominal wall muscle
    atten_scale: float            # tissue attenuation relative to the nominal 0.5-0.7 dB/cm/MHz
    rib_period_mm: float          # rib + intercostal space, centre to centre
    rib_half_width_mm: float
    rib_slope: float              # ribs descend laterally: y drops by slope * |x|
    rib_offset_mm: float          # y of a rib centre at x = 0
    notch_radius_mm: float        # cardiac notch of the left lung around the parasternal window
    subcostal_mm: tuple[float, float]   # (x, y) of the subcostal window below the xiphoid
    window_jitter_mm: float       # how far ribs/notch were from ideal for this patient


def make_patient(seed: int) -> Patient:
    """Draw a patient from an integer seed (same seed, same patient, bit for bit).

    Raises:
        ValueError: seed is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"patient seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), 4242])
    size = rng.uniform(0.9, 1.12)
    a1 = np.array([0.72, -0.45, 0.52]) + rng.normal(0.0, 0.06, 3)
    a1 /= np.linalg.norm(a1)
    v = np.array([-1.0, -0.15, 0.35]) + rng.normal(0.0, 0.06, 3)
    a2 = v - (v @ a1) * a1
    a2 /= np.linalg.norm(a2)
    chest_radius = rng.uniform(140.0, 200.0)
    fat = rng.uniform(4.0, 20.0)
    muscle = rng.uniform(7.0, 11.0)
    ax, ay = rng.uniform(86.0, 100.0), rng.uniform(8.0, 28.0)
    wall = rng.uniform(8.0, 10.5) * size
    # The LV apex touches the chest wall (apex beat): endocardium one apical wall below it.
    outer_apex = np.array([ax, ay, skin_z(ax, chest_radius) - fat - muscle - 4.0])
    apex = outer_apex - 0.75 * wall * a1
    jitter = abs(rng.normal(0.0, 2.5))
    return Patient(
        seed=int(seed),
        heart_rate_bpm=float(rng.uniform(58.0, 100.0)),
        systole_frac=float(rng.uniform(0.32, 0.38)),
        phase0=float(rng.uniform(0.0, 1.0)),
        size=float(size),
        lv_length_mm=float(rng.uniform(76.0, 86.0) * size),
        lv_radius_mm=float(rng.uniform(22.0, 26.0) * size),
        ejection_fraction=float(rng.uniform(0.55, 0.70)),
        wall_mm=float(wall),
        rv_wall_mm=float(rng.uniform(3.0, 4.5)),
        long_axis=tuple(float(x) for x in a1),
        rv_axis=tuple(float(x) for x in a2),
        apex_mm=tuple(float(x) for x in apex),
        chest_radius_mm=float(chest_radius),
        fat_mm=float(fat),
        muscle_mm=float(muscle),
        atten_scale=float(rng.uniform(0.8, 1.1) * (1.0 + (fat - 4.0) / 80.0)),
        rib_period_mm=float(rng.uniform(28.0, 35.0)),
        rib_half_width_mm=float(rng.uniform(5.5, 7.0)),
        rib_slope=0.35,
        rib_offset_mm=float(np.clip(rng.normal(0.0, jitter), -6.0, 6.0)),  # refined against the windows below
        notch_radius_mm=float(rng.uniform(30.0, 50.0)),
        subcostal_mm=(float(rng.uniform(2.0, 18.0)), float(-rng.uniform(40.0, 60.0))),
        window_jitter_mm=float(jitter),
    )


# ----------------------------------------------------------------------------------- quadrics
def _quadric(a: np.ndarray, b: np.ndarray, c) -> np.ndarray:
    """4x4 matrix (or [..., 4, 4] batch) of f(P) = P^T a P + 2 b.P + c."""
    a, b, c = np.asarray(a, float), np.asarray(b, float), np.asarray(c, float)
    q = np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-1], c.shape) + (4, 4))
    q[..., :3, :3] = a
    q[..., :3, 3] = b
    q[..., 3, :3] = b
    q[..., 3, 3] = c
    return q


def _centred(a: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Quadric of the region {(P - center)^T a (P - center) < 1}; batches over leading dims."""
    center = np.asarray(center, float)
    ac = np.einsum("...ij,...j->...i", a, center)
    return _quadric(a, -ac, np.einsum("...i,...i->...", center, ac) - 1.0)


def ellipsoid(center: np.ndarray, axes: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Inside of an ellipsoid; `axes` columns are its unit axes, `semi` the semi-axes (mm).

    center [..., 3] and semi [..., 3] may carry a batch (e.g. one per cardiac phase).
    """
    inv2 = 1.0 / np.square(np.asarray(semi, dtype=np.float64))
    a = np.einsum("ij,...j,kj->...ik", axes, inv2, axes)
    return _centred(a, center)


def cylinder(center: np.ndarray, axis: np.ndarray, radius: float) -> np.ndarray:
    """Inside of an infinite circular cylinder around a line (center may be a batch [..., 3])."""
    axis = axis / np.linalg.norm(axis)
    a = (np.eye(3) - np.outer(axis, axis)) / radius ** 2
    return _centred(a, center)


def elliptic_cylinder(center: np.ndarray, e1: np.ndarray, e2: np.ndarray, r1: float, r2: float) -> np.ndarray:
    """Inside of an infinite elliptic cylinder with cross-section axes e1, e2 (unit, orthogonal)."""
    a = np.outer(e1, e1) / r1 ** 2 + np.outer(e2, e2) / r2 ** 2
    return _centred(a, center)


def halfspace(point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Points on the side of the plane opposite to `normal`: (P - point).normal < 0 (point may be a batch)."""
    n = np.asarray(normal, dtype=np.float64)
    point = np.asarray(point, float)
    return _quadric(np.zeros((3, 3)), 0.5 * n, -(point @ n))


def skin_band(chest_radius_mm: float, depth_mm: float) -> np.ndarray:
    """Points less than depth_mm below the skin (depth measured along z)."""
    a = np.zeros((3, 3))
    a[0, 0] = -1.0 / (2.0 * chest_radius_mm)
    return _quadric(a, np.array([0.0, 0.0, -0.5]), -depth_mm)


def dome_below(y0: float, x0: float, z0: float, kx: float, kz: float) -> np.ndarray:
    """Points below the paraboloid y = y0 - kx (x - x0)^2 - kz (z - z0)^2 (diaphragm)."""
    a = np.diag([kx, 0.0, kz])
    b = np.array([-kx * x0, 0.5, -kz * z0])
    return _quadric(a, b, kx * x0 ** 2 + kz * z0 ** 2 - y0)


# ------------------------------------------------------------------------------------ phases
def contraction(phase: np.ndarray, systole_frac: float) -> np.ndarray:
    """0 at end-diastole, 1 at end-systole, smooth (LV volume follows 1 - EF * contraction)."""
    p = np.asarray(phase, dtype=np.float64) % 1.0
    relax = 0.2
    up = 0.5 * (1.0 - np.cos(np.pi * np.clip(p / systole_frac, 0.0, 1.0)))
    down = 0.5 * (1.0 + np.cos(np.pi * np.clip((p - systole_frac) / relax, 0.0, 1.0)))
    return np.where(p < systole_frac, up, down)


def _smooth_window(p: np.ndarray, start: float, end: float, ramp: float) -> np.ndarray:
    rise = np.clip((p - start) / ramp, 0.0, 1.0)
    fall = np.clip((end - p) / ramp, 0.0, 1.0)
    return np.minimum(rise, fall) ** 2 * (3.0 - 2.0 * np.minimum(rise, fall))


def av_valve_opening(phase: np.ndarray, systole_frac: float) -> np.ndarray:
    """Mitral/tricuspid opening 0..1: open in diastole (E wave, diastasis, A wave), shut in systole."""
    p = np.asarray(phase, dtype=np.float64) % 1.0
    open_ = _smooth_window(p, systole_frac + 0.04, 0.97, 0.05)
    diastasis = 1.0 - 0.45 * _smooth_window(p, systole_frac + 0.25, 0.82, 0.08)
    return open_ * diastasis


def semilunar_opening(phase: np.ndarray, systole_frac: float) -> np.ndarray:
    """Aortic valve opening 0..1: open during ejection only."""
    p = np.asarray(phase, dtype=np.float64) % 1.0
    return _smooth_window(p, 0.04, systole_frac - 0.01, 0.04)


# ------------------------------------------------------------------------------------ layers
@dataclass
class Layer:
    name: str
    cls: int
    heart: bool
    rows: list[int] = field(default_factory=list)


@dataclass
class Valve:
    """A valve: annulus centre/axis/radius (mm) and leaflet geometry per phase."""

    name: str
    center: np.ndarray      # [N_PHASES, 3]
    axis: np.ndarray        # [3], direction in which the leaflets open (downstream)
    radius_mm: float
    leaflet_mm: float
    angle_deg: np.ndarray   # [N_PHASES] leaflet angle from the annulus plane (0 shut, ~80 open)
    ref: np.ndarray         # [3] direction in the annulus plane of the first leaflet's hinge
    e1: np.ndarray = field(init=False)
    e2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.axis = self.axis / np.linalg.norm(self.axis)
        e1 = self.ref - (self.ref @ self.axis) * self.axis
        self.e1 = e1 / np.linalg.norm(e1)
        self.e2 = np.cross(self.axis, self.e1)


class Anatomy:
    """Geometry of one patient: quadric stack per phase, layers, valves, ribs and view targets."""

    def __init__(self, patient: Patient) -> None:
        self.patient = pt = patient
        self.chest_radius_mm = pt.chest_radius_mm
        a1 = np.array(pt.long_axis)
        a2 = np.array(pt.rv_axis)
        a3 = np.cross(a1, a2)
        self.a1, self.a2, self.a3 = a1, a2, a3
        self.heart_axes = np.stack([a1, a2, a3], axis=1)
        apex = np.array(pt.apex_mm)
        self.mitral0 = apex - pt.lv_length_mm * a1   # mitral annulus centre at end-diastole
        self.wall_depth_mm = pt.fat_mm + pt.muscle_mm
        self._build()
        self.targets, self.aims = self._targets()
        self._fit_windows()

    # heart frame -> patient frame
    def H(self, s: float, t: float, q: float) -> np.ndarray:
        return self.mitral0 + s * self.a1 + t * self.a2 + q * self.a3

    def _build(self) -> None:
        pt = self.patient
        a1, a2, a3, ax = self.a1, self.a2, self.a3, self.heart_axes
        L, B, T, k = pt.lv_length_mm, pt.lv_radius_mm, pt.wall_mm, pt.size
        phases = np.arange(N_PHASES) / N_PHASES
        kc = contraction(phases, pt.systole_frac)
        rows: list[np.ndarray] = []  # per row, [N_PHASES, 4, 4]
        layers: list[Layer] = []

        def add_row(q: np.ndarray) -> int:
            rows.append(np.broadcast_to(q, (N_PHASES, 4, 4)))
            return len(rows) - 1

        def layer(name: str, cls: str, heart: bool, *row_ids: int) -> None:
            layers.append(Layer(name, CLASS[cls], heart, list(row_ids)))

        # LV: apex fixed, base descends by up to 12% of the length; radius to the EF.
        shrink = 0.12 * L * kc
        s_base = shrink
        a_d = 0.75 * L
        b_es = B * np.sqrt((1.0 - pt.ejection_fraction) * a_d / (a_d - 0.12 * L))
        b_cav = B - (B - b_es) * kc
        a_cav = a_d - shrink
        c_lv = L - a_cav
        # Outer radius keeps the myocardial volume (wall thickens in systole).
        b_out = np.sqrt(b_cav ** 2 + ((B + T) ** 2 - B ** 2) * a_d / a_cav)
        self.s_base = s_base

        def H_(s, t, q):
            """Heart frame -> patient frame; s, t, q may be arrays over phases."""
            s, t, q = (np.asarray(v, float)[..., None] for v in (s, t, q))
            return self.mitral0 + s * a1 + t * a2 + q * a3

        zeros = np.zeros(N_PHASES)
        c_lv_p = H_(c_lv, zeros, zeros)                                         # [N_PHASES, 3]
        lv_cav = ellipsoid(c_lv_p, ax, np.stack([a_cav, b_cav, b_cav], axis=1))
        lv_out = ellipsoid(c_lv_p, ax, np.stack([a_cav + 0.75 * T, b_out, b_out], axis=1))
        peri_lv = ellipsoid(c_lv_p, ax, np.stack([a_cav + 0.75 * T + 3.0, b_out + 3.0, b_out + 3.0], axis=1))
        base_cut = halfspace(H_(s_base, zeros, zeros), -a1)
        base_cut2 = halfspace(H_(s_base - 3.0, zeros, zeros), -a1)

        # RV: an ellipsoid centred on the LV's RV-side surface; the LV myocardium carves the septum.
        bt = B + T
        rv_s0, rv_a = 0.3 * L, 0.52 * L
        rv_t = 30.0 * k * (1.0 - 0.2 * kc)
        rv_q = 38.0 * k * (1.0 - 0.08 * kc)
        rv_c = H_(rv_s0, bt, -6.0 * k)
        rv_w = pt.rv_wall_mm
        rv_semi = np.stack([np.full(N_PHASES, rv_a), rv_t, rv_q], axis=1)
        rv_cav = ellipsoid(rv_c, ax, rv_semi)
        rv_out = ellipsoid(rv_c, ax, rv_semi + rv_w)
        peri_rv = ellipsoid(rv_c, ax, rv_semi + rv_w + 2.5)
        s_tv = s_base + 7.0 * k
        tv_cut = halfspace(H_(s_tv, zeros, zeros), -a1)
        tv_cut2 = halfspace(H_(s_tv - 3.0, zeros, zeros), -a1)

        # Atria behind the AV valves; they fill while the ventricles contract.
        grow = (1.0 + 0.1 * kc)[:, None]
        la_c = H_(s_base - 21.0 * k, zeros - 3.0, zeros + 6.0)
        la_semi = np.array([22.0, 19.0, 18.0]) * k
        la_cav = ellipsoid(la_c, ax, la_semi * grow)
        la_wall = ellipsoid(la_c, ax, la_semi * grow + 2.5)
        ra_c = H_(s_tv - 20.0 * k, zeros + bt + 6.0 * k, zeros + 4.0)
        ra_semi = np.array([21.0, 18.0, 18.0]) * k
        ra_cav = ellipsoid(ra_c, ax, ra_semi * grow)
        ra_wall = ellipsoid(ra_c, ax, ra_semi * grow + 2.0)

        # Aortic root from the aortic valve (anterior, septal side of the mitral valve).
        psi = np.radians(-60.0)
        e_av = np.cos(psi) * a2 + np.sin(psi) * a3
        self.e_plax = e_av
        ao_dir = -0.85 * a1 + 0.4 * e_av + 0.25 * np.array([0.0, 1.0, 0.0])
        ao_dir /= np.linalg.norm(ao_dir)
        ao_r = 13.5 * k
        av_c = H_(s_base - 3.0, zeros, zeros) + 15.0 * k * e_av                  # [N_PHASES, 3]
        ao_lumen = cylinder(av_c, ao_dir, ao_r)
        ao_wall = cylinder(av_c, ao_dir, ao_r + 2.5)
        ao_start = halfspace(av_c - 14.0 * ao_dir, -ao_dir)
        ao_end = halfspace(av_c + 50.0 * ao_dir, ao_dir)
        ao_wall_start = halfspace(av_c - 2.0 * ao_dir, -ao_dir)

        # Pulmonary artery from the RV outflow: anterior, up and back toward the left.
        pa_c = H_(-6.0 * k, bt * 0.55, -34.0 * k)
        pa_dir = np.array([0.35, 0.6, -0.72])
        pa_dir /= np.linalg.norm(pa_dir)
        pa_r = 11.5 * k
        pa_lumen = cylinder(pa_c, pa_dir, pa_r)
        pa_wall = cylinder(pa_c, pa_dir, pa_r + 2.0)
        pa_start = halfspace(pa_c, -pa_dir)
        pa_end = halfspace(pa_c + 45.0 * pa_dir, pa_dir)

        # Descending aorta: behind the left atrium, running head-feet.
        la_mean = la_c[0]
        dao_c = la_mean + np.array([12.0, 0.0, -(la_semi[2] + 17.0)])
        dao_dir = np.array([0.05, 1.0, 0.08])
        dao_r = 10.5 * k
        dao_lumen = cylinder(dao_c, dao_dir, dao_r)
        dao_wall = cylinder(dao_c, dao_dir, dao_r + 2.0)

        # Chest wall, out-of-body air, mediastinum, diaphragm / liver.
        Rc = pt.chest_radius_mm
        outside = _quadric(np.diag([-1.0 / (2 * Rc), 0.0, 0.0]), np.array([0.0, 0.0, -0.5]), 0.0)
        skin = skin_band(Rc, 2.0)
        fat = skin_band(Rc, pt.fat_mm)
        wall = skin_band(Rc, pt.fat_mm + pt.muscle_mm)
        sternum = elliptic_cylinder(np.array([0.0, 0.0, -(pt.fat_mm + 5.0)]), np.array([1.0, 0.0, 0.0]),
                                    np.array([0.0, 0.0, 1.0]), 14.0, 5.0)
        sternum_cut = halfspace(np.array([0.0, 18.0, 0.0]), np.array([0.0, -1.0, 0.0]))

        heart_c = H_(0.3 * L, 12.0 * k, 0.0)
        # mediastinal soft tissue around the heart, reaching down to the diaphragm under it
        med = ellipsoid(heart_c + 18.0 * a3, ax, np.array([0.5 * L + 50.0, 66.0 * k, 72.0 * k]))

        # soft tissue between the inferior surface of the heart and the diaphragm (no lung there)
        subcardiac = ellipsoid(heart_c + np.array([0.0, -45.0, -10.0]), np.eye(3), np.array([85.0, 50.0, 70.0]) * k)
        # Diaphragm dome just under the heart: the lowest point of the dome touches the heart.
        pts = self._surface_points([(lv_out[0], None), (rv_out[0], None)])
        xd, zd, kx, kz = heart_c[0] - 25.0, heart_c[2], 1.0 / 500.0, 1.0 / 600.0
        y0 = float(np.min(pts[:, 1] + kx * (pts[:, 0] - xd) ** 2 + kz * (pts[:, 2] - zd) ** 2)) + 2.0
        self.dome = (y0, xd, zd, kx, kz)
        liver = dome_below(y0 - 5.0, xd, zd, kx, kz)
        diaphragm = dome_below(y0, xd, zd, kx, kz)

        self._notch_rows = (add_row(np.eye(4)), add_row(np.eye(4)))  # filled by _fit_windows
        r = add_row
        layer("outside", "outside", False, r(outside))
        layer("skin", "skin", False, r(skin))
        layer("sternum", "bone", False, r(sternum), r(sternum_cut), r(wall))
        layer("fat", "fat", False, r(fat))
        layer("muscle", "muscle", False, r(wall))
        i_base = r(base_cut)
        layer("lv_cavity", "blood", True, r(lv_cav), i_base)
        layer("lvot_aorta", "blood", True, r(ao_lumen), r(ao_start), r(ao_end))
        i_out = r(lv_out)
        layer("lv_myocardium", "myocardium", True, i_out, r(base_cut2))
        i_tv = r(tv_cut)
        layer("rv_cavity", "blood", True, r(rv_cav), i_tv)
        layer("rv_wall", "thin_wall", True, r(rv_out), r(tv_cut2))
        i_la, i_ra = r(la_cav), r(ra_cav)
        layer("la_cavity", "blood", True, i_la)
        layer("ra_cavity", "blood", True, i_ra)
        layer("la_wall", "thin_wall", True, r(la_wall))
        layer("ra_wall", "thin_wall", True, r(ra_wall))
        layer("aortic_wall", "vessel_wall", False, r(ao_wall), r(ao_wall_start), r(ao_end))
        i_pa_s, i_pa_e = r(pa_start), r(pa_end)
        layer("pa_lumen", "blood", False, r(pa_lumen), i_pa_s, i_pa_e)
        layer("pa_wall", "vessel_wall", False, r(pa_wall), i_pa_s, i_pa_e)
        layer("dao_lumen", "blood", False, r(dao_lumen))
        layer("dao_wall", "vessel_wall", False, r(dao_wall))
        layer("pericardium_lv", "pericardium", False, r(peri_lv), r(base_cut2))
        layer("pericardium_rv", "pericardium", False, r(peri_rv), r(tv_cut2))
        layer("liver", "liver", False, r(liver))
        layer("diaphragm", "diaphragm", False, r(diaphragm))
        layer("mediastinum", "soft", False, r(med))
        layer("notch", "soft", False, *self._notch_rows)
        layer("subcardiac", "soft", False, r(subcardiac))
        # default (no layer): lung
        self.rows = rows
        self.layers = layers
        self.heart_center = heart_c

        # Valves: annulus centre per phase, opening direction, leaflet angle per phase.
        av_open = av_valve_opening(phases, pt.systole_frac)
        sl_open = semilunar_opening(phases, pt.systole_frac)
        e_plax_perp = np.cross(a1, e_av)
        self.valves = [
            Valve("mitral", H_(s_base, zeros, zeros), a1, 14.5 * k,
                  15.0 * k, 8.0 + 70.0 * av_open, e_av),
            Valve("tricuspid", H_(s_tv, zeros + bt + 14.0 * k, zeros), a1, 13.5 * k,
                  14.0 * k, 8.0 + 68.0 * av_open, a3),
            Valve("aortic", av_c, ao_dir, 11.0 * k, 11.5 * k, 12.0 + 72.0 * sl_open, e_plax_perp),
        ]
        self.valve_center = np.stack([v.center for v in self.valves], axis=1)     # [N_PHASES, V, 3]
        self.valve_angle = np.stack([v.angle_deg for v in self.valves], axis=1)   # [N_PHASES, V]
        self.valve_axis = np.stack([v.axis for v in self.valves])
        self.valve_e1 = np.stack([v.e1 for v in self.valves])
        self.valve_e2 = np.stack([v.e2 for v in self.valves])
        self.valve_radius = np.array([v.radius_mm for v in self.valves])
        self.valve_leaflet = np.array([v.leaflet_mm for v in self.valves])
        self.s_tv = s_tv

    @staticmethod
    def _surface_points(quads) -> np.ndarray:
        """Points on the surface of ellipsoids (quadric matrices) on a coarse sphere of directions."""
        g = np.random.default_rng(0).normal(size=(400, 3))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        out = []
        for q, _ in quads:
            a = q[:3, :3]
            c = -np.linalg.solve(a, q[:3, 3])
            k = float(c @ a @ c - q[3, 3])
            # points c + s g with (s g)^T a (s g) = k
            s = np.sqrt(k / np.einsum("ni,ij,nj->n", g, a, g))
            out.append(c + s[:, None] * g)
        return np.concatenate(out)

    # ------------------------------------------------------------------------------ windows
    def _skin_hit(self, point: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Where the ray point + t * direction (t > 0) meets the skin."""
        Rc = self.chest_radius_mm
        d = direction / np.linalg.norm(direction)
        # z + x^2 / (2 Rc) = 0 along the ray: quadratic in t
        a = d[0] ** 2 / (2 * Rc)
        b = d[2] + point[0] * d[0] / Rc
        c = point[2] + point[0] ** 2 / (2 * Rc)
        if a < 1e-12:
            t = -c / b
        else:
            disc = max(b * b - 4 * a * c, 0.0)
            roots = sorted([(-b - np.sqrt(disc)) / (2 * a), (-b + np.sqrt(disc)) / (2 * a)])
            t = next(r for r in roots if r > 0)
        return point + t * d

    def _targets(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Target pose [5] of each standard view, and the heart point [3] its beam aims at (mm)."""
        pt = self.patient
        a1, a2, a3 = self.a1, self.a2, self.a3
        L, Rc = pt.lv_length_mm, pt.chest_radius_mm
        targets: dict[str, np.ndarray] = {}
        aims: dict[str, np.ndarray] = {}
        # PLAX: plane through the LV long axis and the aortic valve; beam perpendicular to the long
        # axis at the base (septum and posterior wall horizontal); marker toward the aortic root.
        e = self.e_plax if self.e_plax[2] > 0 else -self.e_plax
        m = self.H(0.35 * L, 0.0, 0.0)
        # beam halfway between perpendicular to the long axis and the in-plane direction closest to
        # the skin normal: the LV slopes a little (apex up), as in most real PLAX images
        nrm = np.array([0.0, 0.0, 1.0])
        pz = nrm - (nrm @ a1) * a1 - (nrm @ e) * e
        pz = nrm - pz  # component of z inside the plane (a1, e)
        pz /= np.linalg.norm(pz)
        d = (e + pz) / np.linalg.norm(e + pz)
        p = self._skin_hit(m, d)
        targets["PLAX"], aims["PLAX"] = pose_from_axes(p[0], p[1], m - p, -a1, Rc), m
        # PSAX (mid-papillary): same spot, beam to the LV centre at mid length, plane as close to
        # perpendicular to the long axis as the beam allows; marker toward the left shoulder.
        # The probe stays in the same intercostal space: it slides so that the tilted beam crosses the
        # rib layer where the PLAX beam does.
        m2 = self.H(0.5 * L, 0.0, 0.0)
        want = targets["PLAX"][2] + 90.0
        cross_plax = np.array(self._rib_crossing(targets["PLAX"]))
        ps = p.copy()
        for _ in range(3):
            w = (m2 - ps) / np.linalg.norm(m2 - ps)
            u = np.cross(a1, w)
            cands = [pose_from_axes(ps[0], ps[1], w, sgn * u, Rc) for sgn in (1.0, -1.0)]
            psax = min(cands, key=lambda c: abs((c[2] - want + 180.0) % 360.0 - 180.0))
            shift = cross_plax - np.array(self._rib_crossing(psax))
            ps = np.array([ps[0] + shift[0], ps[1] + shift[1], 0.0])
            ps[2] = skin_z(ps[0], Rc)
        targets["PSAX"], aims["PSAX"] = psax, m2
        # A4C: from the apex along the long axis; plane through both AV valves; LV on screen right.
        apex = np.array(pt.apex_mm)
        pa = self._skin_hit(apex, a1)
        crux = self.H(0.0, 0.45 * (pt.lv_radius_mm + pt.wall_mm), 0.0)
        w = (crux - pa) / np.linalg.norm(crux - pa)
        targets["A4C"], aims["A4C"] = pose_from_axes(pa[0], pa[1], w, -a2, Rc), crux
        # A2C: from the same apical spot, the plane through the LV long axis turned 60 degrees
        # counter-clockwise (seen from behind the probe) from the four-chamber plane: LV and LA only.
        mc = self.H(0.0, 0.0, 0.0)
        w = (mc - pa) / np.linalg.norm(mc - pa)
        ang = np.radians(60.0)
        lat = np.cos(ang) * (-a2) + np.sin(ang) * np.cross(a1, -a2)
        cands = [pose_from_axes(pa[0], pa[1], w, sgn * lat, Rc) for sgn in (1.0, -1.0)]
        want = targets["A4C"][2] - 60.0
        targets["A2C"] = min(cands, key=lambda c: abs((c[2] - want + 180.0) % 360.0 - 180.0))
        aims["A2C"] = mc
        # SC4C: below the xiphoid, beam up under the ribs to the heart, plane close to the 4C plane,
        # marker to the patient's left.
        xs, ys = pt.subcostal_mm
        ps = np.array([xs, ys, skin_z(xs, Rc)])
        aim = self.H(0.2 * L, 0.35 * (pt.lv_radius_mm + pt.wall_mm), 0.0)
        w = (aim - ps) / np.linalg.norm(aim - ps)
        u = np.cross(w, a3)
        u = u if u[0] > 0 else -u
        targets["SC4C"], aims["SC4C"] = pose_from_axes(xs, ys, w, u, Rc), aim
        return targets, aims

    def rib_depth_mm(self) -> float:
        """Depth of the rib centres below the skin."""
        return self.patient.fat_mm + 0.45 * self.patient.muscle_mm + 3.0

    def _rib_crossing(self, pose: np.ndarray) -> tuple[float, float]:
        """(x, y) where the central beam of a pose reaches the depth of the ribs."""
        p, rot = probe_axes(pose, self.chest_radius_mm)
        w = rot[:, 2]
        target, t = self.rib_depth_mm(), 0.0
        for _ in range(20):
            q = p + t * w
            depth = skin_z(q[0], self.chest_radius_mm) - q[2]
            t += (target - depth) / max(0.2, -w[2] - q[0] * w[0] / self.chest_radius_mm)
        q = p + t * w
        return float(q[0]), float(q[1])

    def _fit_windows(self) -> None:
        """Put the intercostal spaces and the lung's cardiac notch where this patient's windows are."""
        pt = self.patient
        P = pt.rib_period_mm
        # where the central beams of PLAX and A4C cross the rib layer
        xp, yp = self._rib_crossing(self.targets["PLAX"])
        xa, ya = self._rib_crossing(self.targets["A4C"])
        # Rib centres lie on y = y0 - slope |x| + k P. Put both windows mid-space: solve slope and y0,
        # choosing the whole number of ribs between the windows that keeps the slope most natural.
        dx = abs(xp) - abs(xa)
        if abs(dx) < 5.0:
            slope = pt.rib_slope
        else:
            slope = min((((k * P) - (yp - ya)) / dx for k in range(-8, 9)), key=lambda s_: abs(s_ - pt.rib_slope))
        self.rib_slope_fit = float(slope)
        # the jitter moves the ribs off the ideal place for some patients (partly shadowed windows)
        self.rib_y0 = yp + slope * abs(xp) - 0.5 * P + pt.rib_offset_mm
        self.rib_period = P
        # Cardiac notch: an elliptic cylinder from the parasternal window toward the LV centre, so the
        # parasternal beams reach the heart without lung; patients with a small notch have lung in
        # the lateral part of the sector.
        Rc = pt.chest_radius_mm
        yp0, xp0 = self.targets["PLAX"][0], self.targets["PLAX"][1]
        c = np.array([xp0, yp0, skin_z(xp0, Rc)])
        nrm = self.H(0.45 * pt.lv_length_mm, 0.0, 0.0) - c
        nrm /= np.linalg.norm(nrm)
        e1 = np.cross(nrm, [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(nrm, e1)
        r = pt.notch_radius_mm
        self.rows[self._notch_rows[0]] = np.broadcast_to(elliptic_cylinder(c, e1, e2, r, r * 1.4), (N_PHASES, 4, 4))
        self.rows[self._notch_rows[1]] = np.broadcast_to(halfspace(c + 80.0 * nrm, nrm), (N_PHASES, 4, 4))
        self.quadrics = np.stack(self.rows, axis=1).astype(np.float64)  # [N_PHASES, K, 4, 4]

    # -------------------------------------------------------------------------------- ribs
    def ribs_mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Bone of the ribs at points (x, y, z) (any equal shapes): periodic bars in the chest wall."""
        pt = self.patient
        ax = np.abs(x)
        depth = skin_z(x, pt.chest_radius_mm) - z
        dz = (depth - self.rib_depth_mm()) * (1.0 / 5.0)
        v = y - self.rib_y0 + self.rib_slope_fit * ax
        ph = (v % self.rib_period) * (1.0 / pt.rib_half_width_mm)
        ph = np.minimum(ph, self.rib_period / pt.rib_half_width_mm - ph)
        inside = ph * ph + dz * dz < 1.0
        # no ribs below the costal margin (subcostal window) nor over the sternum (separate layer)
        return inside & (y > -0.62 * ax + 4.0) & (ax > 16.0)

    def phase(self, t: float) -> float:
        """Cardiac phase in [0, 1) at time t (s)."""
        return (self.patient.phase0 + t * self.patient.heart_rate_bpm / 60.0) % 1.0

    def quadrics_at(self, t: float) -> np.ndarray:
        """[K, 4, 4] quadric stack at time t (linear interpolation between precomputed phases)."""
        f = self.phase(t) * N_PHASES
        i = int(f) % N_PHASES
        j = (i + 1) % N_PHASES
        w = f - int(f)
        return (1.0 - w) * self.quadrics[i] + w * self.quadrics[j]

    def valve_state(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Annulus centres [V, 3] and leaflet angles [V] (deg) of all valves at time t."""
        f = self.phase(t) * N_PHASES
        i = int(f) % N_PHASES
        j = (i + 1) % N_PHASES
        w = f - int(f)
        return ((1 - w) * self.valve_center[i] + w * self.valve_center[j],
                (1 - w) * self.valve_angle[i] + w * self.valve_angle[j])
