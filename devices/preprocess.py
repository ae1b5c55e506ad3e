"""The one image preprocessing used by training, export calibration and the edge runtime."""
from __future__ import annotations

import cv2
import numpy as np

INPUT_SIZE = 128
# Normalization after scaling to [0, 1]; written into every bundle manifest.
NORM_MEAN = 0.15
NORM_STD = 0.2


def preprocess(image: np.ndarray, size: int = INPUT_SIZE, mean: float = NORM_MEAN,
               std: float = NORM_STD) -> np.ndarray:
    """uint8 [H, W] B-mode image -> float32 [1, size, size] model input.

    The image is padded to a square (apex stays at the top centre) and resized with area
    averaging, so non-square scanner crops keep their geometry.
    """
    if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"preprocess needs a non-empty uint8 [H, W] image, got {image.shape} {image.dtype}")
    h, w = image.shape
    if h != w:
        side = max(h, w)
        left = (side - w) // 2
        image = cv2.copyMakeBorder(image, 0, side - h, left, side - w - left, cv2.BORDER_CONSTANT, value=0)
    if image.shape[0] != size:
        interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interp)
    x = image.astype(np.float32) * np.float32(1.0 / (255.0 * std)) - np.float32(mean / std)
    return x[None]
