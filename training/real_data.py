"""Loaders for real echo datasets, for users who have them. Each returns `FrameArrays` with partial labels.

Real data has no probe pose, so action and pose labels are always missing (-1 / NaN) and only the
view (and sometimes quality) losses train on it. Layouts (exactly as distributed):

EchoNet-Dynamic (https://echonet.github.io/dynamic/):
    <root>/FileList.csv            columns FileName,...,Split  (Split: TRAIN | VAL | TEST)
    <root>/Videos/<FileName>.avi   (FileName with or without the .avi extension)
    -> every clip is an apical 4-chamber view: view A4C, no quality.

CAMUS (https://www.creatis.insa-lyon.fr/Challenge/camus/, NIfTI release):
    <root>/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz
    <root>/patientXXXX/patientXXXX_{2CH,4CH}_half_sequence.nii.gz   (optional, used when present)
    <root>/patientXXXX/Info_{2CH,4CH}.cfg   with a line "ImageQuality: Good|Medium|Poor"
    (patient folders may also sit one level down, e.g. <root>/database_nifti/patientXXXX)
    -> view A2C / A4C; quality of that view: Good = 0.9, Medium = 0.65, Poor = 0.3 (grades 4-5, 3 and
    1-2 on the 5-point scale mapped to 0..1, on the same side of QUALITY_DIAGNOSTIC = 0.6 as the grade
    is of "3 or better"). Segmentation files (*_gt.nii.gz) are ignored. NIfTI arrays are stored
    (width, height[, time]) and transposed to (height, width) so the apex is at the top.

Generic:
    <root>/labels.csv  columns file,view[,quality][,split]; file relative to root: .avi/.mp4 clip,
    .dcm (single or multi-frame) or .png/.jpg image; view one of VIEW_LABELS (empty = unknown);
    quality 0..1 of the image as that view (empty = unknown).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from devices.base import CorruptData, SourceNotFound, UnsupportedFormat, to_gray_uint8
from devices.labels import POSE_AXES, VIEWS, view_index
from training.data import FrameArrays

CAMUS_QUALITY = {"good": 0.9, "medium": 0.65, "poor": 0.3}
MAX_SIDE_PX = 256  # frames are downsized to this on load to keep memory small (preprocess goes to 128)
VIDEO_EXT = (".avi", ".mp4", ".mov", ".mkv")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp")


def _even(n_total: int, k: int) -> list[int]:
    """k frame indices spread evenly over n_total (all of them when k >= n_total)."""
    if k <= 0 or k >= n_total:
        return list(range(n_total))
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, k)})


def _shrink(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    s = MAX_SIDE_PX / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def read_video_frames(path: Path, k: int) -> list[np.ndarray]:
    """k evenly spaced gray frames of a video file. Raises SourceNotFound / CorruptData."""
    if not path.is_file():
        raise SourceNotFound(f"video {path} does not exist")
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(f)
    finally:
        cap.release()
    if not frames:
        raise CorruptData(f"video {path} has no decodable frames (damaged file or unsupported codec)")
    return [_shrink(to_gray_uint8(frames[i], what=str(path))) for i in _even(len(frames), k)]


def read_dicom_frames(path: Path, k: int) -> list[np.ndarray]:
    """k evenly spaced gray frames of a (multi-frame) DICOM file."""
    import pydicom

    if not path.is_file():
        raise SourceNotFound(f"DICOM file {path} does not exist")
    try:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for bad files
        raise CorruptData(f"DICOM file {path} cannot be decoded: {e}") from e
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    frames = [px] if n == 1 else list(px)
    return [_shrink(to_gray_uint8(frames[i], what=str(path))) for i in _even(len(frames), k)]


def read_nifti_frames(path: Path, k: int) -> list[np.ndarray]:
    """k evenly spaced frames of a 2D or 2D+t NIfTI file, transposed to (height, width)."""
    import nibabel as nib

    if not path.is_file():
        raise SourceNotFound(f"NIfTI file {path} does not exist")
    try:
        data = np.asarray(nib.load(str(path)).get_fdata())
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for bad files
        raise CorruptData(f"NIfTI file {path} cannot be read: {e}") from e
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise CorruptData(f"NIfTI file {path}: expected a 2D image or 2D+t sequence, got shape {data.shape}")
    return [_shrink(to_gray_uint8(data[:, :, i].T, what=str(path))) for i in _even(data.shape[2], k)]


def read_frames(path: Path, k: int) -> list[np.ndarray]:
    """Frames of any supported file, by extension."""
    name = path.name.lower()
    if name.endswith(VIDEO_EXT):
        return read_video_frames(path, k)
    if name.endswith(".dcm"):
        return read_dicom_frames(path, k)
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti_frames(path, k)
    if name.endswith(IMAGE_EXT):
        if not path.is_file():
            raise SourceNotFound(f"image {path} does not exist")
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise CorruptData(f"image {path} cannot be decoded")
        return [_shrink(img)]
    raise UnsupportedFormat(f"{path}: unsupported file type (use {', '.join(VIDEO_EXT + IMAGE_EXT)}, .dcm, .nii.gz)")


class _Builder:
    """Collects frames with partial labels, then makes FrameArrays."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.views: list[int] = []
        self.quality: list[np.ndarray] = []
        self.clips: list[str] = []

    def add(self, frames: list[np.ndarray], view: int, quality: float, clip: str) -> None:
        q = np.full(len(VIEWS), np.nan, dtype=np.float32)
        if view >= 0 and view < len(VIEWS) and np.isfinite(quality):
            q[view] = quality
        for f in frames:
            self.images.append(f)
            self.views.append(view)
            self.quality.append(q)
            self.clips.append(clip)

    def build(self, root: Path) -> FrameArrays:
        n = len(self.images)
        if n == 0:
            raise ValueError(f"{root}: no frames found for the requested split")
        return FrameArrays(self.images, np.asarray(self.views, dtype=np.int64), np.stack(self.quality),
                           np.full((n, len(VIEWS)), -1, dtype=np.int64),
                           np.full((n, len(VIEWS), len(POSE_AXES)), np.nan, dtype=np.float32),
                           {"clip": np.asarray(self.clips)})


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise SourceNotFound(f"{path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {cols}")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def load_echonet(root: str | Path, split: str | None = None, frames_per_clip: int = 8,
                 max_clips: int | None = None) -> FrameArrays:
    """EchoNet-Dynamic: every clip labelled A4C (quality, action, pose missing).

    Args:
        root: folder with FileList.csv and Videos/.
        split: "train", "val" or "test" (the Split column, case-insensitive); None = all.
        frames_per_clip: frames sampled evenly from each clip.
        max_clips: read at most this many clips (quick evaluation).
    """
    root = Path(root)
    rows = _read_csv(root / "FileList.csv", ("FileName", "Split"))
    if split:
        rows = [r for r in rows if r["Split"].lower() == split.lower()]
    b = _Builder()
    for r in rows[:max_clips]:
        name = r["FileName"] if r["FileName"].lower().endswith(".avi") else r["FileName"] + ".avi"
        path = root / "Videos" / name
        b.add(read_video_frames(path, frames_per_clip), view_index("A4C"), np.nan, str(path))
    return b.build(root)


def parse_camus_cfg(path: Path) -> dict[str, str]:
    """`key: value` lines of a CAMUS Info_*.cfg file."""
    if not path.is_file():
        raise SourceNotFound(f"CAMUS info file {path} does not exist")
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def camus_patients(root: Path) -> list[Path]:
    """Patient folders at the root or one level down (database_nifti/)."""
    found = sorted(p for p in root.glob("patient*") if p.is_dir())
    return found or sorted(p for p in root.glob("*/patient*") if p.is_dir())


def load_camus(root: str | Path, frames_per_clip: int = 8, max_patients: int | None = None) -> FrameArrays:
    """CAMUS: 2CH -> A2C, 4CH -> A4C, quality from Info_*.cfg ImageQuality (Good/Medium/Poor).

    Uses the half sequence when present (frames_per_clip frames), else the ED and ES frames.

    Raises:
        SourceNotFound: no patient folders, or a missing Info file / image.
        ValueError: an ImageQuality value other than Good, Medium or Poor.
    """
    root = Path(root)
    patients = camus_patients(root)
    if not patients:
        raise SourceNotFound(f"{root}: no CAMUS patient folders (patientXXXX/) found")
    b = _Builder()
    for pdir in patients[:max_patients]:
        for chamber, view in (("2CH", "A2C"), ("4CH", "A4C")):
            cfg_path = pdir / f"Info_{chamber}.cfg"
            grade = parse_camus_cfg(cfg_path).get("ImageQuality", "")
            if grade.lower() not in CAMUS_QUALITY:
                raise ValueError(f"{cfg_path}: ImageQuality must be Good, Medium or Poor, got '{grade}'")
            half = pdir / f"{pdir.name}_{chamber}_half_sequence.nii.gz"
            if half.is_file():
                frames = read_nifti_frames(half, frames_per_clip)
            else:
                frames = [f for phase in ("ED", "ES")
                          for f in read_nifti_frames(pdir / f"{pdir.name}_{chamber}_{phase}.nii.gz", 1)]
            b.add(frames, view_index(view), CAMUS_QUALITY[grade.lower()], f"{pdir.name}_{chamber}")
    return b.build(root)


def load_generic(root: str | Path, split: str | None = None, frames_per_clip: int = 8) -> FrameArrays:
    """A folder of clips/images + labels.csv (file,view[,quality][,split]); see the module docstring.

    Raises:
        SourceNotFound: labels.csv or a listed file is missing.
        ValueError: an unknown view name or a quality outside 0..1 (the message names file and row).
    """
    root = Path(root)
    csv_path = root / "labels.csv"
    rows = _read_csv(csv_path, ("file", "view"))
    b = _Builder()
    for line, r in enumerate(rows, start=2):
        if split and r.get("split") and r["split"].lower() != split.lower():
            continue
        try:
            view = view_index(r["view"]) if r["view"] else -1
            quality = float(r["quality"]) if r.get("quality") else np.nan
        except ValueError as e:
            raise ValueError(f"{csv_path} line {line}: {e}") from e
        if np.isfinite(quality) and not 0.0 <= quality <= 1.0:
            raise ValueError(f"{csv_path} line {line}: quality must be in 0..1, got {quality}")
        b.add(read_frames(root / r["file"], frames_per_clip), view, quality, r["file"])
    return b.build(root)


LAYOUTS: dict[str, Callable[..., FrameArrays]] = {"echonet": load_echonet, "camus": load_camus,
                                                  "generic": load_generic}


def detect_layout(root: str | Path) -> str:
    """Which layout a folder has: "echonet", "camus" or "generic".

    Raises:
        SourceNotFound: the folder does not exist or matches none of the layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceNotFound(f"dataset folder {root} does not exist")
    if (root / "FileList.csv").is_file():
        return "echonet"
    if (root / "labels.csv").is_file():
        return "generic"
    if camus_patients(root):
        return "camus"
    raise SourceNotFound(f"{root}: not a known dataset layout: expected FileList.csv + Videos/ (EchoNet-Dynamic), "
                         "patientXXXX/ folders (CAMUS) or labels.csv (generic)")


def load_real(root: str | Path, split: str | None = None, frames_per_clip: int = 8) -> FrameArrays:
    """Load any supported real dataset folder (layout detected)."""
    layout = detect_layout(root)
    if layout == "camus":
        return load_camus(root, frames_per_clip)
    return LAYOUTS[layout](root, split=split, frames_per_clip=frames_per_clip)
