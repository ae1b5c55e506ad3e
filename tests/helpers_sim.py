"""Shared fixtures-free helpers for the simulator tests (tests/test_sim_*.py)."""
from __future__ import annotations

import functools

import numpy as np

# Patients whose parasternal, apical and subcostal windows are clear at the targets (acoustic >= 0.9
# for PLAX, A4C and SC4C): checked by test_sim_labels.test_clear_window_patients_are_clear.
CLEAR_SEEDS = (0, 5)


@functools.lru_cache(maxsize=8)
def probe(seed: int = 0, size: int = 64):
    """A cached non-realtime probe (building a patient takes ~0.1 s)."""
    from devices.sim import ScanSettings, SimulatedProbe

    return SimulatedProbe(seed, settings=ScanSettings(size_px=size), realtime=False)


def corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images over a mask."""
    m = np.ones(a.shape, bool) if mask is None else mask
    x = a[m].astype(np.float64) - a[m].mean()
    y = b[m].astype(np.float64) - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
