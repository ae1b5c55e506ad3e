"""Temporal smoothing for the guidance engine: averages by time, and a stable instruction.

Both work on the caller's clock (`t` in seconds), never on the wall clock, so simulated time and
replays faster than real time behave exactly like a live run.
"""
from __future__ import annotations

import math

import numpy as np


class TimeEMA:
    """Exponential moving average whose memory is set in seconds, not in frames.

    A sample `dt` seconds after the previous one gets weight `1 - exp(-dt / tau_s)`, so the
    average covers the same span of time at 15 fps and at 60 fps. An EMA with time constant tau has
    the same mean lag as a sliding window of length 2 * tau.

    Args:
        tau_s: time constant in seconds (0 = no smoothing: the latest sample).
    """

    def __init__(self, tau_s: float) -> None:
        if tau_s < 0:
            raise ValueError(f"smoothing time constant must be >= 0 s, got {tau_s}")
        self.tau_s = float(tau_s)
        self.value: np.ndarray | float | None = None
        self._t: float | None = None

    def reset(self) -> None:
        """Forget the past: the next sample becomes the average."""
        self.value, self._t = None, None

    def update(self, x, t: float):
        """Add sample `x` (scalar or array) taken at time `t`; returns the new average."""
        x = np.array(x, dtype=np.float64) if np.ndim(x) else float(x)
        if self.value is None or self._t is None or t < self._t:
            # First sample, or the clock went backwards (a looping file): start again.
            self.value = x
        else:
            dt = max(t - self._t, 1e-4)
            alpha = 1.0 if self.tau_s == 0 else 1.0 - math.exp(-dt / self.tau_s)
            self.value = self.value + alpha * (x - self.value)
        self._t = t
        return self.value


class ActionSelector:
    """Picks the instruction from smoothed action probabilities without flicker.

    The shown action changes only when another action beats it by `margin` (hysteresis) AND the
    current one has been shown for at least `min_dwell_s`, so a novice gets time to act on it.

    Args:
        margin: probability lead another action needs to replace the current one (0..1).
        min_dwell_s: minimum time an instruction stays on screen, in seconds.
    """

    def __init__(self, margin: float, min_dwell_s: float) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"hysteresis margin must be in [0, 1), got {margin}")
        if min_dwell_s < 0:
            raise ValueError(f"minimum dwell must be >= 0 s, got {min_dwell_s}")
        self.margin = float(margin)
        self.min_dwell_s = float(min_dwell_s)
        self.current: int | None = None
        self._since = 0.0

    def reset(self) -> None:
        """No current instruction: the next update shows the best action at once."""
        self.current = None

    def update(self, probs: np.ndarray, t: float) -> int:
        """Action index to show at time `t` given smoothed probabilities [A]."""
        best = int(np.argmax(probs))
        if self.current is None or t < self._since:
            self.current, self._since = best, t
        elif (best != self.current and probs[best] - probs[self.current] >= self.margin
              and t - self._since >= self.min_dwell_s):
            self.current, self._since = best, t
        return self.current
