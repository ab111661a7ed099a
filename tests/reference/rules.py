"""Reference FedAsync (exact and delta), FedBuff (mean/median/trimmed mean) and FedAvg.

Conventions (same published rules the aggregator documents in docs/aggregator.md):
* staleness ``d`` = server versions since the device's base version ``tau``;
* FedAsync: ``t`` is the version being produced, ``alpha_t = alpha * s(t - tau)``;
* exact FedAsync can only use base slices that were announced and (``history_size`` set)
  are among the newest ``history_size`` announced ones; ``history_size=None`` and
  ``max_staleness=None`` are the rule an aggregator shard follows (every announced slice
  stays available, the staleness bound is the coordinator's, before acknowledgement).
  Announcement cadence (:func:`announces`): version ``t``
  is announced when ``t - last >= keep_every`` and ``clock - last_ts >= min_interval``,
  where ``clock`` = max ``ts`` of the applied updates (``min_interval = 0``: every
  ``keep_every``-th version);
* update ids already accepted are ignored (exactly-once effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefUpdate:
    update_id: str
    base_version: int
    delta: list[float]
    num_samples: int = 1
    ts: float = 0.0  # accepted_ts (stream clock for the announcement cadence)
    support: list[int] | None = None  # coordinates a sparse update sent; None = dense


@dataclass
class RefResult:
    x: np.ndarray
    version: int
    applied: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def s_constant(d: int, a: float, b: float) -> float:
    return 1.0


def s_polynomial(d: int, a: float, b: float) -> float:
    return 1.0 / math.pow(d + 1, a)


def s_hinge(d: int, a: float, b: float) -> float:
    if d <= b:
        return 1.0
    return 1.0 / (a * (d - b) + 1.0)


STALENESS = {"constant": s_constant, "polynomial": s_polynomial, "hinge": s_hinge}


def _finite(values: list[float]) -> bool:
    for v in values:
        if math.isnan(v) or math.isinf(v):
            return False
    return True


def _clip(delta: list[float], c: float) -> list[float]:
    if c <= 0:
        return list(delta)
    norm = math.sqrt(sum(v * v for v in delta))
    if norm <= c:
        return list(delta)
    return [v * c / norm for v in delta]


class RefMedianBound:
    """The adaptive bound, written out independently of ``aggregator.strategies.adaptive``:
    ``bound(v) = multiplier * lower median of (the last window - 1 admitted values + [v])``,
    lower median of ``n`` sorted values = the ``(n - 1) // 2``-th. ``multiplier = 0``: off."""

    def __init__(self, multiplier: float, window: int) -> None:
        self.multiplier, self.window = multiplier, window
        self.admitted: list[float] = []

    def bound(self, v: float) -> float:
        keep = self.admitted[max(0, len(self.admitted) - (self.window - 1)) :]
        pool = sorted([*keep, v])
        return self.multiplier * pool[(len(pool) - 1) // 2]

    def cap(self, n: int) -> int:
        """A claimed sample count capped at the bound (at least 1)."""
        if self.multiplier <= 0:
            return n
        return min(n, max(1, math.floor(self.bound(float(n)))))


class RefAdaptiveClip:
    """Both adaptive bounds on a delta: every coordinate clipped to ``peaks``' bound ``P``
    on the largest ``|value|``; then the delta scaled down to L2 norm ``B`` (``norms``'
    bound) if its pre-clip norm ``n`` is at most ``B``, else to ``B * B / n``. The windows
    hold the pre-clip values of the updates applied so far."""

    def __init__(self, multiplier: float, window: int) -> None:
        self.norms = RefMedianBound(multiplier, window)
        self.peaks = RefMedianBound(multiplier, window)
        self._last = (0.0, 0.0)

    def clip(self, delta: list[float]) -> list[float]:
        norm = math.sqrt(sum(v * v for v in delta))
        peak = max((abs(v) for v in delta), default=0.0)
        self._last = (norm, peak)
        if self.norms.multiplier <= 0:
            return list(delta)
        cap = self.peaks.bound(peak)
        out = [min(max(v, -cap), cap) for v in delta] if peak > cap else list(delta)
        now = math.sqrt(sum(v * v for v in out))
        b = self.norms.bound(norm)
        target = b if norm <= b else b * b / norm
        return [v * target / now for v in out] if now > target else out

    def applied(self) -> None:
        """The update last clipped was applied: its values join the windows."""
        self.norms.admitted.append(self._last[0])
        self.peaks.admitted.append(self._last[1])


class RefCadence:
    """The announcement rule, written out independently of ``aggregator.job_shard.Cadence``."""

    def __init__(self, every: int, min_interval: float = 0.0) -> None:
        self.every, self.min_interval = every, min_interval
        self.clock, self.last, self.last_ts = 0.0, 0, 0.0
        self.announced = [0]

    def applied(self, ts: float, new_version: int | None) -> None:
        self.clock = max(self.clock, ts)
        if new_version is None or new_version - self.last < self.every:
            return
        if self.min_interval > 0 and self.clock - self.last_ts < self.min_interval:
            return
        self.last, self.last_ts = new_version, self.clock
        self.announced.append(new_version)


def fedasync(
    x0: list[float],
    stream: list[RefUpdate],
    *,
    alpha: float,
    staleness: str = "polynomial",
    a: float = 0.5,
    b: float = 4.0,
    keep_every: int = 1,
    history_size: int | None = 16,
    max_staleness: int | None = 64,
    clip_norm: float = 0.0,
    delta_form: bool = False,
    min_interval: float = 0.0,
    announced: list[int] | None = None,
    sparse_mix: str = "support",
    clip_multiplier: float = 0.0,
    clip_window: int = 100,
) -> RefResult:
    """``announced``, when given, receives the regularly announced versions in order.

    ``clip_multiplier > 0``: the adaptive bounds (:class:`RefAdaptiveClip`) clip the delta
    first, then ``clip_norm`` applies.

    Exact form with a sparse update (``support`` given) and ``sparse_mix="support"``: the
    mixing applies on the sent coordinates only, the others keep ``x_{t-1}``.
    """
    s = STALENESS[staleness]
    cad = RefCadence(keep_every, min_interval)
    bound = RefAdaptiveClip(clip_multiplier, clip_window)
    n = len(x0)
    versions: list[list[float]] = [list(map(float, x0))]  # versions[t] = x_t
    seen: set[str] = set()
    res = RefResult(np.array(x0, dtype=np.float64), 0)
    for u in stream:
        if u.update_id in seen:
            continue
        t_prev = len(versions) - 1
        if not _finite(u.delta):
            res.rejected[u.update_id] = "non_finite"
            continue
        if u.base_version > t_prev:
            res.rejected[u.update_id] = "future_version"
            continue
        d = t_prev - u.base_version
        if max_staleness is not None and d > max_staleness:
            res.rejected[u.update_id] = "too_stale"
            continue
        delta = bound.clip(u.delta)
        delta = _clip(delta, clip_norm)
        t = t_prev + 1
        a_t = alpha * s(t - u.base_version, a, b)
        prev = versions[t_prev]
        new = [0.0] * n
        if delta_form:
            for i in range(n):
                new[i] = prev[i] + a_t * delta[i]
        else:
            published = cad.announced[-history_size:] if history_size else cad.announced
            if u.base_version != t_prev and u.base_version not in published:
                res.rejected[u.update_id] = "too_stale" if history_size else "unknown_base"
                continue
            base = versions[u.base_version]
            sent = set(range(n) if u.support is None or sparse_mix == "all" else u.support)
            for i in range(n):
                if i in sent:
                    x_new = base[i] + delta[i]
                    new[i] = (1.0 - a_t) * prev[i] + a_t * x_new
                else:
                    new[i] = prev[i]
        versions.append(new)
        seen.add(u.update_id)
        res.applied.append(u.update_id)
        bound.applied()
        cad.applied(u.ts, t)
    if announced is not None:
        announced.extend(cad.announced)
    res.x = np.array(versions[-1], dtype=np.float64)
    res.version = len(versions) - 1
    return res


def fedbuff(
    x0: list[float],
    stream: list[RefUpdate],
    *,
    k: int,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    max_staleness: int | None = 64,
    clip_norm: float = 0.0,
    reducer: str = "mean",
    trim: float = 0.1,
    fedavg: bool = False,
    clip_multiplier: float = 0.0,
    clip_window: int = 100,
) -> RefResult:
    """FedBuff: sum_i (1+s_i)^-0.5 D_i / K (or robust reduce); FedAvg: sum n_i D_i / sum n_i.

    ``clip_multiplier > 0``: the adaptive bound clips each delta (as in :func:`fedasync`)
    and, for FedAvg, caps each claimed ``n_i`` at the same rule over the claims.
    """
    bound = RefAdaptiveClip(clip_multiplier, clip_window)
    claims = RefMedianBound(clip_multiplier if fedavg else 0.0, clip_window)
    n = len(x0)
    x = [float(v) for v in x0]
    version = 0
    buf: list[list[float]] = []
    weights: list[float] = []
    m = [0.0] * n
    seen: set[str] = set()
    res = RefResult(np.array(x0, dtype=np.float64), 0)
    for u in stream:
        if u.update_id in seen:
            continue
        if not _finite(u.delta):
            res.rejected[u.update_id] = "non_finite"
            continue
        if u.base_version > version:
            res.rejected[u.update_id] = "future_version"
            continue
        st = version - u.base_version
        if max_staleness is not None and st > max_staleness:
            res.rejected[u.update_id] = "too_stale"
            continue
        if fedavg and st != 0:
            res.rejected[u.update_id] = "wrong_round"
            continue
        delta = bound.clip(u.delta)
        delta = _clip(delta, clip_norm)
        w = float(claims.cap(u.num_samples)) if fedavg else 1.0 / math.sqrt(1.0 + st)
        buf.append([w * v for v in delta])
        weights.append(w)
        seen.add(u.update_id)
        res.applied.append(u.update_id)
        bound.applied()
        claims.admitted.append(float(u.num_samples))
        if len(buf) < k:
            continue
        agg = [0.0] * n
        for i in range(n):
            col = sorted(row[i] for row in buf)
            if fedavg:
                agg[i] = sum(col) / sum(weights)
            elif reducer == "mean":
                agg[i] = sum(col) / len(buf)
            elif reducer == "median":
                mid = len(col) // 2
                agg[i] = col[mid] if len(col) % 2 else (col[mid - 1] + col[mid]) / 2.0
            else:
                cut = int(trim * len(col))
                kept = col[cut : len(col) - cut]
                agg[i] = sum(kept) / len(kept)
        for i in range(n):
            m[i] = momentum * m[i] + agg[i]
            x[i] = x[i] + server_lr * m[i]
        version += 1
        buf, weights = [], []
    res.x = np.array(x, dtype=np.float64)
    res.version = version
    return res
