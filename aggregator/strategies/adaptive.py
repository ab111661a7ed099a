"""Adaptive bounds: clip a delta (and cap a claimed sample count) relative to its peers.

A fixed ``clip_norm`` needs the user to know the scale of the updates; these add-ons learn
it from the stream. Each keeps the last ``window - 1`` admitted values (pre-clip slice L2
norms and largest ``|value|``, or claimed ``num_samples``) and bounds the current value
``v`` by

    bound = multiplier * lower_median(those values + [v])

where ``lower_median`` of ``n`` sorted values is element ``(n - 1) // 2``. It is robust as
long as fewer than half the values in the window are an attacker's: the bound stays
within the honest values' range however large the attacker's are. Including ``v`` is the
warm-up rule: the first update is taken as it is (nothing to compare it with), the second
is bounded by ``multiplier`` times the smaller of the two, and so on, so there is no
unprotected warm-up phase. ``multiplier >= 1`` keeps every value up to the median intact.

The windows are state: a function of the updates admitted so far, in order, saved in
:class:`StrategyState` (``arrays["clip:norms"]``, ``["clip:peaks"]``, ``["cap:samples"]``,
as float32, which is also how values are held in memory), so a shard restored from its
checkpoint and replaying the log reaches the same model bit for bit. A value enters its
window only once the inner strategy accepted the update.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

import numpy as np

from aggregator.strategies.base import (
    Applied,
    Chunk,
    Strategy,
    StrategyState,
    Update,
    Wrapper,
    rescaled,
)
from schemas.types import F32

NORMS_KEY = "clip:norms"
PEAKS_KEY = "clip:peaks"
CLIPPED_KEY = "clip:clipped"
SAMPLES_KEY = "cap:samples"
_F32_MAX = float(np.finfo(np.float32).max)


def f32(v: float) -> float:
    """``v`` rounded to float32 (what the window stores), saturating instead of ``inf``."""
    return float(np.float32(min(v, _F32_MAX)))


def l2_norm(values: F32) -> float:
    """L2 norm accumulated in float64 (numpy's pairwise sum: the same on every host)."""
    return math.sqrt(float(np.sum(np.square(values, dtype=np.float64))))


class MedianWindow:
    """The last ``size - 1`` admitted values (float32), and the lower median with one more."""

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError("window size must be >= 2")
        self.size = size
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._fifo)

    def median_with(self, v: float) -> float:
        """Lower median of the stored values plus ``f32(v)``."""
        v, s = f32(v), self._sorted
        k = len(s) // 2  # (n - 1) // 2 with n = len(s) + 1
        pos = bisect.bisect_left(s, v)
        if k < pos:
            return s[k]
        return v if k == pos else s[k - 1]

    def push(self, v: float) -> None:
        v = f32(v)
        if len(self._fifo) == self.size - 1:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._fifo.append(v)
        bisect.insort(self._sorted, v)

    def to_array(self) -> F32:
        return np.array(self._fifo, dtype=np.float32)

    def load(self, values: F32 | None) -> None:
        self._fifo.clear()
        self._sorted.clear()
        for v in [] if values is None else np.asarray(values, dtype=np.float32).tolist():
            self.push(float(v))


class _Windowed(Wrapper):
    """A wrapper whose state is one :class:`MedianWindow`, stored under ``key``."""

    key: str

    def __init__(self, inner: Strategy, *, multiplier: float, window: int) -> None:
        super().__init__(inner)
        if not 1.0 <= multiplier:
            raise ValueError("multiplier must be >= 1")
        self.multiplier = multiplier
        self.window = MedianWindow(window)

    def bound(self, v: float) -> float:
        return self.multiplier * self.window.median_with(v)

    def get_state(self) -> StrategyState:
        st = self.inner.get_state()
        st.arrays[self.key] = self.window.to_array()
        return st

    def set_state(self, state: StrategyState) -> None:
        self.window.load(state.arrays.get(self.key))
        self.inner.set_state(state)


class AdaptiveClip(_Windowed):
    """Bound a slice's delta relative to its peers, in two norms, both ``multiplier`` x the
    lower median of their window (``P`` for the largest ``|value|``, ``B`` for the L2
    norm, each over the pre-clip values):

    1. every coordinate is clipped to ``[-P, P]``;
    2. the delta is scaled down to L2 norm ``T`` if it is longer, where ``T = B`` for an
       update whose (pre-clip) norm ``n`` is at most ``B`` and ``T = B * B / n`` past it:
       up to the bound an update counts in full, past it the less the further (a
       redescending bound, as in robust M-estimators; plain clipping to ``B`` lets a
       100 x or a sign-flipped 4 x update count as much as the largest honest one).

    The peak bound stops an update that spends its whole allowance on one coordinate (the
    hostile tester's +1e4 on one output bias).
    """

    key = NORMS_KEY

    def __init__(self, inner: Strategy, *, multiplier: float, window: int) -> None:
        super().__init__(inner, multiplier=multiplier, window=window)
        self.peaks = MedianWindow(window)
        self.clipped = 0  # updates changed so far (state: a replay counts the same)

    def apply(self, update: Update) -> Applied:
        values = update.chunk.values
        norm = l2_norm(values)
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        cap, bound = self.multiplier * self.peaks.median_with(peak), self.bound(norm)
        out: Update = update
        if f32(peak) > cap:
            values = np.clip(values, -cap, cap).astype(np.float32)
            chunk = Chunk(self.params.size, values, update.chunk.indices)
            out = Update(chunk, update.base_version, update.num_samples, update.update_id)
        target = bound if norm <= bound else bound * (bound / norm)  # redescending
        now = norm if out is update else l2_norm(values)
        if now > target:
            chunk = rescaled(out.chunk, self.params.size, target / now)
            out = Update(chunk, update.base_version, update.num_samples, update.update_id)
        res = self.inner.apply(out)
        self.clipped += out is not update
        self.window.push(norm)  # only once the inner rule took it
        self.peaks.push(peak)
        return res

    def get_state(self) -> StrategyState:
        st = super().get_state()
        st.arrays[PEAKS_KEY] = self.peaks.to_array()
        st.scalars[CLIPPED_KEY] = float(self.clipped)
        return st

    def set_state(self, state: StrategyState) -> None:
        super().set_state(state)
        self.peaks.load(state.arrays.get(PEAKS_KEY))
        self.clipped = int(state.scalars.get(CLIPPED_KEY, 0.0))


class CapSamples(_Windowed):
    """Cap a claimed ``num_samples`` at ``multiplier`` x the window's lower median claim
    (rules that weight by it, FedAvg: one forged count must not outweigh a round)."""

    key = SAMPLES_KEY

    def apply(self, update: Update) -> Applied:
        n = update.num_samples
        cap = max(1, int(self.bound(float(n))))
        if n > cap:
            update = Update(update.chunk, update.base_version, cap, update.update_id)
        res = self.inner.apply(update)
        self.window.push(float(n))
        return res
