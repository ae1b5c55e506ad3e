"""Simulator datasets: frames rendered on the fly or pre-rendered to .npz shards, split by patient.

Splits (patient seeds, disjoint, so no patient is in two splits):
    train   seeds      0 ..  9999   (a run uses 0 .. N-1)
    val     seeds  10000 .. 19999
    test    seeds  20000 .. 29999   (`pocus val --seed S` uses 20000 + 1000*S ...)
Scanner settings vary per patient and per frame group (depth, sector width, gain, dynamic range);
depth >= HELDOUT_DEPTH_MM is never used for training: `heldout=True` draws only such depths, so the
model is tested on a setting it never saw.

Pose mix per patient (so guidance is learned everywhere): ~35% "near" a random target (normalized
distance 0..1.5, about half inside HOLD_RADIUS), ~35% "medium" (1.5..4, around the edge of the
view), ~30% "far": the simulator's random starts on an acoustic window.

Shard format (one file per patient, `<out>/<split>/p<seed:05d>.npz`, written atomically):
    image        uint8   [K, S, S]  B-mode frames as rendered
    view         int64   [K]        index in VIEW_LABELS
    quality      float32 [K, V]     0..1
    action       int64   [K, V]     index in ACTIONS
    pose_offset  float32 [K, V, 5]  target - current in mm / deg (NOT normalized; see `normalize_pose`)
    acoustic     float32 [K]        simulator acoustic factor (shadowing), for analysis
    mode         int8    [K]        0 near, 1 medium, 2 far
    depth_mm, sector_deg, gain_db, dynamic_range_db  float32 [K]   scanner settings of each frame
    patient_seed int64   [K]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import torch.utils.data

from devices.labels import ACTIONS, POSE_SCALE, VIEW_LABELS, VIEWS
from devices.preprocess import INPUT_SIZE, preprocess

SPLIT_SEED_BASE = {"train": 0, "val": 10_000, "test": 20_000}
HELDOUT_DEPTH_MM = 190.0
# Ranges (low, high) drawn uniformly. Training never sees depth >= HELDOUT_DEPTH_MM.
TRAIN_SETTINGS = {"depth_mm": (120.0, 185.0), "sector_deg": (70.0, 90.0), "gain_db": (-6.0, 6.0),
                  "dynamic_range_db": (50.0, 70.0), "frequency_mhz": (2.5, 3.5), "clutter": (0.5, 1.5)}
HELDOUT_SETTINGS = {**TRAIN_SETTINGS, "depth_mm": (HELDOUT_DEPTH_MM, 200.0)}
POSE_MIX = (0.35, 0.35, 0.30)          # near, medium, far
NEAR_RADIUS = (0.0, 1.5)               # normalized pose distance of "near" frames
MEDIUM_RADIUS = (1.5, 4.0)
SETTING_GROUPS = 4                     # settings redrawn this many times per patient
# Render at size x k then area-resize to size (exactly what preprocess does to a larger frame), so
# the model sees both native 128 px speckle and the smoother speckle of a downsized 192/256 px frame.
RENDER_SCALES = ((1.0, 0.5), (1.5, 0.25), (2.0, 0.25))   # (scale, probability)
LABEL_KEYS = ("view", "quality", "action", "pose_offset")
SHARD_KEYS = ("image", "view", "quality", "action", "pose_offset", "acoustic", "mode", "depth_mm",
              "sector_deg", "gain_db", "dynamic_range_db", "patient_seed")

ProbeFactory = Callable[[int, dict, int], Any]  # (patient_seed, settings, size_px) -> probe


def split_seeds(split: str, n: int, offset: int = 0) -> list[int]:
    """Patient seeds of a split: `n` seeds from the split's base (+ offset).

    Raises:
        ValueError: unknown split or more than 10000 patients.
    """
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split '{split}': choose one of {', '.join(SPLIT_SEED_BASE)}")
    if n < 0 or offset < 0 or offset + n > 10_000:
        raise ValueError(f"split '{split}' has seeds for 10000 patients; asked for {n} from offset {offset}")
    base = SPLIT_SEED_BASE[split] + offset
    return list(range(base, base + n))


def draw_settings(rng: np.random.Generator, heldout: bool = False) -> dict[str, float]:
    """Random scanner settings (depth, sector, gain, dynamic range) from the train or held-out range."""
    ranges = HELDOUT_SETTINGS if heldout else TRAIN_SETTINGS
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in ranges.items()}


def _scan_settings(settings: dict, size: int) -> dict:
    """The keys of `settings` that ScanSettings knows, plus the output size."""
    import dataclasses

    from devices.sim import ScanSettings

    names = {f.name for f in dataclasses.fields(ScanSettings)}
    return {**{k: v for k, v in settings.items() if k in names}, "size_px": int(size)}


def make_sim_probe(patient_seed: int, settings: dict, size: int = INPUT_SIZE) -> Any:
    """The real simulator probe for one patient (not paced: renders as fast as asked)."""
    from devices.sim import ScanSettings, SimulatedProbe

    return SimulatedProbe(patient_seed=patient_seed, settings=ScanSettings(**_scan_settings(settings, size)),
                          realtime=False)


def _with_settings(probe: Any, factory: ProbeFactory, seed: int, settings: dict, size: int) -> Any:
    """Reuse the patient with new scanner settings when the probe can (`configure`), else a new probe."""
    if probe is not None and hasattr(probe, "configure"):
        probe.configure(**_scan_settings(settings, size))
        return probe
    return factory(seed, settings, size)


@dataclass(frozen=True)
class LoopPoses:
    """Poses the closed loop visits (`pocus eval poses`), as offsets from a target, mixed into the
    training poses with probability `share`: the model then also learns the states its own guidance
    leads novices into (DAgger), not only poses drawn around the targets.

    Attributes:
        view: int [N], index into VIEWS of each offset's target.
        offset: float [N, 5], pose - target pose in mm / deg (POSE_AXES), tremor included.
        share: probability that a training pose comes from here (0..1).
    """

    view: np.ndarray
    offset: np.ndarray
    share: float

    @classmethod
    def load(cls, path: str | os.PathLike, share: float) -> "LoopPoses":
        """Read an .npz written by `pocus eval poses`.

        Raises:
            ValueError: missing file or keys, mismatched shapes, unknown views, NaN offsets, share
                outside (0, 1].
        """
        if not 0.0 < share <= 1.0:
            raise ValueError(f"loop_pose_share must be in (0, 1], got {share}")
        try:
            with np.load(path) as z:
                view, offset = np.asarray(z["view"], np.int64), np.asarray(z["offset"], np.float64)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"loop poses {path}: not an .npz from `pocus eval poses` ({e})") from None
        if (offset.ndim != 2 or offset.shape[1] != len(POSE_SCALE) or len(view) != len(offset) or not len(view)
                or not np.isfinite(offset).all() or view.min() < 0 or view.max() >= len(VIEWS)):
            raise ValueError(f"loop poses {path}: need view [N] in 0..{len(VIEWS) - 1} and finite offset "
                             f"[N, {len(POSE_SCALE)}] with N > 0, got {view.shape} and {offset.shape}")
        return cls(view, offset, float(share))


def sample_training_pose(probe: Any, rng: np.random.Generator, loop: LoopPoses | None = None
                         ) -> tuple[np.ndarray, int]:
    """One pose from the near / medium / far mix, or with probability loop.share one the closed loop
    visited (re-applied to this patient's target; its mode from its distance). Returns (pose [5],
    mode 0|1|2). Without `loop` the random stream is the same as before loop poses existed."""
    if loop is not None and rng.random() < loop.share:
        i = int(rng.integers(len(loop.view)))
        distance = float(np.linalg.norm(loop.offset[i] / POSE_SCALE))
        mode = 0 if distance < NEAR_RADIUS[1] else 1 if distance < MEDIUM_RADIUS[1] else 2
        return np.asarray(probe.target_pose(VIEWS[int(loop.view[i])]), dtype=np.float64) + loop.offset[i], mode
    u = rng.random()
    if u >= POSE_MIX[0] + POSE_MIX[1]:
        return np.asarray(probe.sample_pose(rng, "window"), dtype=np.float64), 2
    mode = 0 if u < POSE_MIX[0] else 1
    radius = rng.uniform(*(NEAR_RADIUS if mode == 0 else MEDIUM_RADIUS))
    direction = rng.normal(size=len(POSE_SCALE))
    direction /= np.linalg.norm(direction) + 1e-12
    target = np.asarray(probe.target_pose(VIEWS[int(rng.integers(len(VIEWS)))]), dtype=np.float64)
    return target + direction * radius * POSE_SCALE, mode


def render_patient(patient_seed: int, frames: int, heldout: bool = False, size: int = INPUT_SIZE,
                   probe_factory: ProbeFactory = make_sim_probe, loop: LoopPoses | None = None
                   ) -> dict[str, np.ndarray]:
    """Render `frames` labelled frames of one patient (deterministic in the seed); `loop` mixes in
    closed-loop poses (sample_training_pose).

    Returns:
        Arrays in the shard format (see module docstring).
    """
    rng = np.random.default_rng([patient_seed, 7, int(heldout)])
    rows: dict[str, list] = {k: [] for k in SHARD_KEYS}
    groups = np.array_split(np.arange(frames), min(SETTING_GROUPS, max(frames, 1)))
    probe = None
    scales, weights = zip(*RENDER_SCALES)
    for group in groups:
        settings = draw_settings(rng, heldout)
        render_px = int(round(size * scales[rng.choice(len(scales), p=weights)]))
        probe = _with_settings(probe, probe_factory, patient_seed, settings, render_px)
        for _ in group:
            pose, mode = sample_training_pose(probe, rng, loop)
            image, labels = probe.render(pose, float(rng.uniform(0.0, 10.0)))
            image = np.asarray(image, dtype=np.uint8)
            if image.shape != (size, size):
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            rows["image"].append(image)
            rows["view"].append(int(labels["view"]))
            rows["quality"].append(np.asarray(labels["quality"], dtype=np.float32))
            rows["action"].append(np.asarray(labels["action"], dtype=np.int64))
            rows["pose_offset"].append(np.asarray(labels["pose_offset"], dtype=np.float32))
            rows["acoustic"].append(float(labels.get("acoustic", np.nan)))
            rows["mode"].append(mode)
            for k in ("depth_mm", "sector_deg", "gain_db", "dynamic_range_db"):
                rows[k].append(settings[k])
            rows["patient_seed"].append(patient_seed)
    dtypes = {"view": np.int64, "action": np.int64, "mode": np.int8, "patient_seed": np.int64, "image": np.uint8}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in rows.items()}


def _ast_text(node: Any) -> str:
    """A syntax tree as text without positions and without empty fields: the same on every Python
    (ast.dump is not: 3.12 adds `type_params=[]` to every def, 3.13 drops empty fields)."""
    import ast

    if isinstance(node, ast.AST):
        fields = [(k, getattr(node, k, None)) for k in node._fields]
        return (type(node).__name__ + "(" + ", ".join(f"{k}={_ast_text(v)}" for k, v in fields
                                                      if v is not None and v != []) + ")")
    if isinstance(node, list):
        return "[" + ", ".join(_ast_text(v) for v in node) + "]"
    return repr(node)


def sim_fingerprint(devices_dir: Path | None = None) -> str:
    """sha256 (16 hex) of the code that makes images and labels (devices/sim/*.py, devices/labels.py):
    shards and checkpoints from another simulator version differ.

    Hashes the syntax tree without docstrings, so comments, docstrings and formatting do not make
    rendered shards look stale; any change to the code does; the Python version does not.
    """
    import ast
    import hashlib

    devices_dir = Path(devices_dir or Path(__file__).resolve().parents[1] / "devices")
    h = hashlib.sha256()
    for path in [*sorted((devices_dir / "sim").glob("*.py")), devices_dir / "labels.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.name.encode() + _ast_text(tree).encode())
    return h.hexdigest()[:16]


def shard_path(out: Path, split: str, seed: int) -> Path:
    return Path(out) / split / f"p{seed:05d}.npz"


def shard_complete(path: Path, frames: int) -> bool:
    """True if `path` is a readable shard with `frames` frames and every key (resume skips it)."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return set(SHARD_KEYS) <= set(z.files) and len(z["view"]) == frames
    except (OSError, ValueError, EOFError):
        return False


def _write_one(job: tuple) -> str:
    out, split, seed, frames, heldout, size, factory = job
    path = shard_path(out, split, seed)
    arrays = render_patient(seed, frames, heldout, size, factory)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a shard on disk is always complete
    return str(path)


def write_dataset(out: str | Path, split: str, patients: int, frames_per_patient: int, workers: int = 2,
                  heldout: bool = False, size: int = INPUT_SIZE, seed_offset: int = 0,
                  probe_factory: ProbeFactory = make_sim_probe, progress: bool = True) -> list[Path]:
    """Pre-render a split to shards, one per patient; complete shards already there are skipped.

    Args:
        out: dataset root; shards go to `<out>/<split>/`.
        split: "train", "val" or "test" (picks the patient seed range).
        patients: number of patients (seeds from the split's base + seed_offset).
        frames_per_patient: frames per patient.
        workers: processes rendering in parallel (1 = in this process).
        heldout: draw only the held-out scanner settings (depth >= HELDOUT_DEPTH_MM).
        size: rendered image size in px (square).
        seed_offset: first seed relative to the split's base.
        probe_factory: (seed, settings, size) -> probe; the real simulator by default.
        progress: show a tqdm bar.

    Returns:
        Paths of all shards of the split (new and skipped).
    """
    from tqdm import tqdm

    if frames_per_patient < 1:
        raise ValueError(f"frames_per_patient must be >= 1, got {frames_per_patient}")
    out = Path(out)
    (out / split).mkdir(parents=True, exist_ok=True)
    seeds = split_seeds(split, patients, seed_offset)
    fingerprint = sim_fingerprint() if probe_factory is make_sim_probe else "custom"
    meta_path = out / split / "dataset.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    stale = old.get("sim_fingerprint", fingerprint) != fingerprint  # the simulator changed: render everything again
    todo = [s for s in seeds if stale or not shard_complete(shard_path(out, split, s), frames_per_patient)]
    meta = {"split": split, "patients": patients, "frames_per_patient": frames_per_patient, "heldout": heldout,
            "size": size, "seed_offset": seed_offset, "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "settings": HELDOUT_SETTINGS if heldout else TRAIN_SETTINGS, "pose_mix": POSE_MIX,
            "sim_fingerprint": fingerprint}
    meta_path.write_text(json.dumps(meta, indent=2))
    jobs = [(out, split, s, frames_per_patient, heldout, size, probe_factory) for s in todo]
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), desc=f"render {split}", unit="patient",
               disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _write_one(job)
            bar.update()
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs):
                bar.update()
    bar.close()
    return [shard_path(out, split, s) for s in seeds]


def normalize_pose(pose_offset: np.ndarray) -> np.ndarray:
    """Pose offsets in mm / deg [..., 5] -> normalized model units (divide by POSE_SCALE)."""
    return (np.asarray(pose_offset, dtype=np.float64) / POSE_SCALE).astype(np.float32)


@dataclass
class FrameArrays:
    """Frames and labels in memory; missing labels are -1 (ints) or NaN (floats).

    `images` is a uint8 [N, S, S] array (simulator) or a list of uint8 [H, W] (real data, any size).
    `pose` is in normalized units. `meta` holds optional per-frame arrays (settings, mode, source).
    """

    images: Any
    view: np.ndarray                         # int64 [N]
    quality: np.ndarray                      # float32 [N, V]
    action: np.ndarray                       # int64 [N, V]
    pose: np.ndarray                         # float32 [N, V, 5], normalized
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.view)

    @staticmethod
    def concat(parts: list["FrameArrays"]) -> "FrameArrays":
        """Join several sets (images become a list if sizes differ)."""
        if not parts:
            raise ValueError("nothing to concatenate: no frames")
        imgs = [p.images for p in parts]
        same = all(isinstance(i, np.ndarray) and i.ndim == 3 for i in imgs) and len({i.shape[1:] for i in imgs}) == 1
        images = np.concatenate(imgs) if same else [im for i in imgs for im in i]
        keys = set.intersection(*(set(p.meta) for p in parts))
        return FrameArrays(images, np.concatenate([p.view for p in parts]),
                           np.concatenate([p.quality for p in parts]), np.concatenate([p.action for p in parts]),
                           np.concatenate([p.pose for p in parts]),
                           {k: np.concatenate([p.meta[k] for p in parts]) for k in keys})

    def subset(self, mask: np.ndarray) -> "FrameArrays":
        """Frames where `mask` is true."""
        idx = np.flatnonzero(mask)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return FrameArrays(images, self.view[idx], self.quality[idx], self.action[idx], self.pose[idx],
                           {k: v[idx] for k, v in self.meta.items()})


def arrays_from_shard(arrays: dict[str, np.ndarray]) -> FrameArrays:
    """Shard arrays (mm/deg offsets) -> FrameArrays (normalized offsets)."""
    meta = {k: np.asarray(arrays[k]) for k in SHARD_KEYS if k not in LABEL_KEYS and k != "image" and k in arrays}
    return FrameArrays(np.asarray(arrays["image"], dtype=np.uint8), np.asarray(arrays["view"], dtype=np.int64),
                       np.asarray(arrays["quality"], dtype=np.float32), np.asarray(arrays["action"], dtype=np.int64),
                       normalize_pose(arrays["pose_offset"]), meta)


def load_shards(folder: str | Path, max_patients: int | None = None) -> FrameArrays:
    """Load every shard `p*.npz` in `folder` into memory.

    Raises:
        FileNotFoundError: the folder does not exist or holds no shards.
        ValueError: a shard is unreadable or lacks a key (the message names the file).
    """
    folder = Path(folder)
    paths = sorted(folder.glob("p*.npz"))
    if not folder.is_dir() or not paths:
        raise FileNotFoundError(f"no shards (p*.npz) in {folder}: render some with "
                                f"`pocus sim dataset --out {folder.parent} --split {folder.name} ...`")
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        made_with = json.loads(meta_path.read_text()).get("sim_fingerprint")
        now = sim_fingerprint()
        if made_with not in (None, "custom", now):
            import warnings

            warnings.warn(f"{folder} was rendered by another simulator version ({made_with}, now "
                          f"{now}): render it again with `pocus sim dataset` to train on today's images")
    parts = []
    for p in paths[:max_patients]:
        try:
            with np.load(p) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"shard {p} is unreadable ({e}); delete it and render again") from e
        missing = [k for k in ("image",) + LABEL_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"shard {p} lacks {missing}; delete it and render again")
        parts.append(arrays_from_shard(arrays))
    return FrameArrays.concat(parts)


def render_arrays(seeds: list[int], frames_per_patient: int, heldout: bool = False, size: int = INPUT_SIZE,
                  probe_factory: ProbeFactory = make_sim_probe, progress: bool = False) -> FrameArrays:
    """Render patients straight into memory (validation / `pocus val` without shards)."""
    from tqdm import tqdm

    parts = [arrays_from_shard(render_patient(s, frames_per_patient, heldout, size, probe_factory))
             for s in tqdm(seeds, desc="render", unit="patient", disable=not progress)]
    return FrameArrays.concat(parts)


def frame_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-frame randomness: the same (seed, epoch, index) gives the same augmentation."""
    return np.random.default_rng([seed, epoch, index])


class FrameDataset(torch.utils.data.Dataset):
    """torch map-style dataset over FrameArrays: augment (uint8) -> preprocess -> model input.

    Items are (image float32 [1, S, S], {"view", "quality", "action", "pose"}).
    Call `set_epoch(e)` before each epoch so augmentations differ per epoch yet stay reproducible.
    """

    def __init__(self, arrays: FrameArrays, augment: Callable | None = None, seed: int = 0,
                 size: int = INPUT_SIZE) -> None:
        self.arrays, self.augment, self.seed, self.size, self.epoch = arrays, augment, seed, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        a = self.arrays
        image = a.images[i]
        if self.augment is not None:
            image = self.augment(image, frame_rng(self.seed, self.epoch, i))
        return preprocess(image, self.size), {"view": a.view[i], "quality": a.quality[i], "action": a.action[i],
                                              "pose": a.pose[i]}


class SimStream(torch.utils.data.IterableDataset):
    """torch IterableDataset that renders frames on the fly; each worker (and rank) owns its patients.

    Args:
        seeds: patient seeds of this stream.
        frames_per_patient: frames rendered per patient before moving to the next one.
        augment, seed, size: as for FrameDataset.
        rank, world_size: distributed split of the patients (before the worker split).
        probe_factory: (seed, settings, size) -> probe.
        shuffle_buffer: frames mixed across patients before yielding.
        loop: closed-loop poses mixed into the pose draw (LoopPoses), or None.
    """

    def __init__(self, seeds: list[int], frames_per_patient: int, augment: Callable | None = None, seed: int = 0,
                 size: int = INPUT_SIZE, rank: int = 0, world_size: int = 1,
                 probe_factory: ProbeFactory = make_sim_probe, shuffle_buffer: int = 256,
                 loop: LoopPoses | None = None) -> None:
        self.seeds, self.k, self.augment, self.seed, self.size = list(seeds), frames_per_patient, augment, seed, size
        self.rank, self.world, self.factory, self.buffer, self.epoch = rank, world_size, probe_factory, shuffle_buffer, 0
        self.loop = loop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.seeds[self.rank::self.world]) * self.k

    def num_batches(self, batch_size: int, workers: int, rank: int | None = None) -> int:
        """Full batches one rank yields per epoch (each DataLoader worker batches its own frames)."""
        mine = self.seeds[self.rank if rank is None else rank::self.world]
        return sum(len(mine[w::max(workers, 1)]) * self.k // batch_size for w in range(max(workers, 1)))

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.seeds[self.rank::self.world][wid::nw]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid])
        buf: list = []
        for s in rng.permutation(mine):
            # New poses every epoch: the patient seed fixes anatomy, the epoch offsets the pose stream.
            arrays = arrays_from_shard(render_patient(int(s) + 100_000 * self.epoch, self.k, False, self.size,
                                                      _SeedFixed(int(s), self.factory), self.loop))
            ds = FrameDataset(arrays, self.augment, int(rng.integers(1 << 31)), self.size)
            buf.extend(ds[i] for i in range(len(ds)))
            while len(buf) > self.buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        rng.shuffle(buf)
        yield from buf


class _SeedFixed:
    """Probe factory that ignores the stream's pose seed and builds the real patient."""

    def __init__(self, seed: int, factory: ProbeFactory) -> None:
        self.seed, self.factory = seed, factory

    def __call__(self, _seed: int, settings: dict, size: int) -> Any:
        return self.factory(self.seed, settings, size)


def label_names() -> dict[str, list[str]]:
    """Label vocabularies (for manifests and reports)."""
    return {"views": list(VIEW_LABELS), "actions": list(ACTIONS)}
