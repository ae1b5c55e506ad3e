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

    An axis whose instruction keeps reversing (CW, CCW, CW ...) is one the model cannot read from
    the images it gets (e.g. rotation while rib or lung hides the heart): following it makes the
    hand wiggle in place. After `reversals` reversals on one axis within `window_s`, that axis is
    set aside for `block_s` and the best instruction on another axis is shown at once.

    Args:
        margin: probability lead another action needs to replace the current one (0..1).
        min_dwell_s: minimum time an instruction stays on screen, in seconds.
        block_s: how long a reversing axis is set aside, in seconds; 0 turns this off.
        window_s: reversals older than this are forgotten, in seconds.
        reversals: reversals within `window_s` that set an axis aside (>= 1).
    """

    def __init__(self, margin: float, min_dwell_s: float, block_s: float = 0.0, window_s: float = 6.0,
                 reversals: int = 2) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"hysteresis margin must be in [0, 1), got {margin}")
        if min_dwell_s < 0:
            raise ValueError(f"minimum dwell must be >= 0 s, got {min_dwell_s}")
        if block_s < 0 or window_s <= 0 or reversals < 1:
            raise ValueError(f"reversal block needs block_s >= 0, window_s > 0 and reversals >= 1, got "
                             f"{block_s}, {window_s}, {reversals}")
        self.margin = float(margin)
        self.min_dwell_s = float(min_dwell_s)
        self.block_s, self.window_s, self.reversals = float(block_s), float(window_s), int(reversals)
        self.current: int | None = None
        self._since = 0.0
        self._shown: list[tuple[float, int]] = []       # (time, action) of recent instruction changes
        self._reversed: list[tuple[float, int]] = []    # (time, axis) of recent reversals
        self._blocked_until: dict[int, float] = {}      # axis -> end of its block

    def reset(self) -> None:
        """No current instruction: the next update shows the best action at once."""
        self.current = None

    def forget(self) -> None:
        """reset(), and forget reversals and set-aside axes (a new target or a new signal)."""
        self.reset()
        self._shown, self._reversed, self._blocked_until = [], [], {}

    def update(self, probs: np.ndarray, t: float) -> int:
        """Action index to show at time `t` given smoothed probabilities [A] (pairs of opposite
        directions, one pair per pose axis, then HOLD)."""
        probs = np.array(probs, dtype=np.float64)
        for axis, until in self._blocked_until.items():
            if t < until:
                probs[2 * axis:2 * axis + 2] = -np.inf
        best = int(np.argmax(probs))
        current_blocked = self.current is not None and probs[self.current] == -np.inf
        if (self.current is None or t < self._since or current_blocked
                or (best != self.current and probs[best] - probs[self.current] >= self.margin
                    and t - self._since >= self.min_dwell_s)):
            if best != self.current and self._reverses_too_often(best, len(probs) // 2, t):
                probs[best - best % 2:best - best % 2 + 2] = -np.inf
                best = int(np.argmax(probs))
            if best != self.current and self.block_s > 0:
                self._shown.append((t, best))
            self.current, self._since = best, t
        return self.current

    def _reverses_too_often(self, action: int, n_axes: int, t: float) -> bool:
        """Count a reversal if `action` undoes a recent instruction; True when its axis is now set aside."""
        if self.block_s <= 0 or action >= 2 * n_axes:
            return False
        self._shown = [(ts, a) for ts, a in self._shown if t - ts <= self.window_s]
        if not any(a == action ^ 1 for _, a in self._shown):
            return False
        axis = action // 2
        self._reversed = [(ts, x) for ts, x in self._reversed if t - ts <= self.window_s] + [(t, axis)]
        if sum(x == axis for _, x in self._reversed) < self.reversals:
            return False
        self._blocked_until[axis] = t + self.block_s
        self._reversed = [(ts, x) for ts, x in self._reversed if x != axis]
        return True
