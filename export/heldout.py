"""Held-out frames for parity, calibration, the int8 gate and the benchmark.

Frames come from simulated patients that training never sees (patient seeds from training's val
range for calibration, from its test range for evaluation), or from a user's folder of images.
Every frame goes through devices.preprocess.preprocess: the one normalization.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from devices.preprocess import INPUT_SIZE, preprocess

CALIB_FIRST_PATIENT = 10000  # training's validation seeds: never trained on
EVAL_FIRST_PATIENT = 20000   # training's test seeds: never trained on nor used to pick a checkpoint
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABEL_KEYS = ("view", "quality", "action")


def sim_frames(n: int, first_patient: int = EVAL_FIRST_PATIENT, frames_per_patient: int = 10,
               size: int = INPUT_SIZE, seed: int = 0, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Render `n` labelled frames from consecutive simulated patients.

    Uses training.data.render_patient, so the frames follow training's pose mix (near / medium /
    far from a target) and scanner-setting ranges, and the accuracy figures are comparable with
    `pocus val` on the same patient seeds.

    Args:
        n: number of frames.
        first_patient: seed of the first patient; patients first_patient, first_patient + 1, ...
        frames_per_patient: frames drawn from each patient.
        size: model input side in pixels.
        seed: added to the patient seeds' offset (another draw of held-out patients).
        progress: show a tqdm bar.

    Returns:
        x float32 [n, 1, size, size]; labels {"view" [n], "quality" [n, V], "action" [n, V]}.

    Raises:
        ValueError: the simulator (devices.sim) is not available, or n < 1.
    """
    if n < 1:
        raise ValueError(f"need at least one held-out frame, got n={n}")
    try:
        import devices.sim  # noqa: F401
        from training.data import render_patient
    except ImportError as e:
        raise ValueError(f"held-out frames come from the simulator, which cannot be imported ({e}); "
                         "pass --calib-dir DIR with images instead") from e
    from tqdm import tqdm

    patients = -(-n // frames_per_patient)
    first = first_patient + seed * patients
    x, labels = [], {k: [] for k in LABEL_KEYS}
    for p in tqdm(range(patients), desc=f"held-out frames (patients {first}+)", disable=not progress, leave=False):
        rows = render_patient(first + p, min(frames_per_patient, n - p * frames_per_patient), size=size)
        x += [preprocess(image, size=size) for image in rows["image"]]
        for k in LABEL_KEYS:
            labels[k].append(np.asarray(rows[k]))
    return np.stack(x), {k: np.concatenate(v) for k, v in labels.items()}


def folder_frames(folder: str | Path, n: int | None = None, size: int = INPUT_SIZE) -> np.ndarray:
    """Read up to `n` grayscale images (png/jpg/bmp/tif, sorted by name) from a folder, preprocessed.

    Raises:
        ValueError: folder missing, no images in it, or an image that cannot be decoded.
    """
    import cv2

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calibration folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:n] if n else files
    x = np.empty((len(files), 1, size, size), np.float32)
    for i, path in enumerate(files):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{path}: cannot decode this image")
        x[i] = preprocess(image, size=size)
    return x
