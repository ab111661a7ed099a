"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation, plus robust variants.

Each arriving delta is weighted by ``w = (1 + s) ** -0.5`` with ``s`` = versions the shard
advanced since the device's base, and accumulated (sparse deltas touch only their
coordinates). After ``K`` updates the shard steps
``m = beta m + sum(w_i D_i) / K``; ``x += server_lr * m`` (``beta = 0``: no momentum) and the
version increases by one. The robust variants keep the ``K`` weighted deltas and replace the
mean by the coordinate-wise median or trimmed mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.strategies.base import (
    Applied,
    SliceStrategy,
    StrategyState,
    Update,
    add_chunk,
    check_shape,
)
from schemas.types import F32


def fedbuff_weight(staleness: int) -> float:
    """``(1 + staleness) ** -0.5``."""
    return float((1.0 + staleness) ** -0.5)


class FedBuff(SliceStrategy):
    """Buffer ``buffer_size`` updates, then apply their staleness-weighted mean."""

    name = "fedbuff"

    def __init__(
        self,
        params: npt.ArrayLike,
        *,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        version: int = 0,
    ) -> None:
        super().__init__(params, version=version)
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError("server_momentum must be in [0, 1)")
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self._acc: F32 = np.zeros_like(self._params)
        self._count = 0
        self._weight_sum = 0.0
        self._momentum: F32 | None = None

    @property
    def buffered(self) -> int:
        return self._count

    def weight(self, update: Update, staleness: int) -> float:
        return fedbuff_weight(staleness)

    def admit(self, update: Update, staleness: int) -> None:
        """Hook for variants that refuse some updates (e.g. FedAvg's round check)."""

    def _accumulate(self, update: Update, w: float) -> None:
        add_chunk(self._acc, update.chunk, w)

    def _reduce(self) -> F32:
        """The buffer's aggregate delta, before server lr and momentum."""
        return self._acc / np.float32(self._count)

    def _reset(self) -> None:
        self._acc.fill(0.0)
        self._count = 0
        self._weight_sum = 0.0

    def apply(self, update: Update) -> Applied:
        check_shape(update.chunk, self._params.size)
        d = self.staleness(update.base_version)
        self.admit(update, d)
        w = self.weight(update, d)
        self._accumulate(update, w)
        self._count += 1
        self._weight_sum += w
        if self._count >= self.buffer_size:
            return Applied(d, w, self._step())
        return Applied(d, w, None)

    def flush(self) -> Applied | None:
        if self._count == 0:
            return None
        return Applied(0, 0.0, self._step())

    def _step(self) -> int:
        step = self._reduce()
        if self.server_momentum > 0.0:
            if self._momentum is None:
                self._momentum = np.zeros_like(self._params)
            self._momentum *= np.float32(self.server_momentum)
            self._momentum += step
            step = self._momentum
        self._params += np.float32(self.server_lr) * step
        self._version += 1
        self._reset()
        return self._version

    def _extra_state(self, state: StrategyState) -> None:
        state.arrays["acc"] = self._acc
        state.scalars["count"] = float(self._count)
        state.scalars["weight_sum"] = self._weight_sum
        if self._momentum is not None:
            state.arrays["momentum"] = self._momentum

    def _load_extra(self, state: StrategyState) -> None:
        self._acc = np.array(state.arrays.get("acc", np.zeros_like(self._params)), np.float32)
        self._count = int(state.scalars.get("count", 0.0))
        self._weight_sum = float(state.scalars.get("weight_sum", 0.0))
        mom = state.arrays.get("momentum")
        self._momentum = None if mom is None else np.array(mom, dtype=np.float32)


class _RobustFedBuff(FedBuff):
    """Keeps the ``K`` weighted deltas densely so a robust rule can replace the mean."""

    def __init__(self, params: npt.ArrayLike, **kw: Any) -> None:
        super().__init__(params, **kw)
        self._deltas: list[F32] = []

    def _accumulate(self, update: Update, w: float) -> None:
        dense = np.zeros_like(self._params)
        add_chunk(dense, update.chunk, w)
        self._deltas.append(dense)

    def _reset(self) -> None:
        super()._reset()
        self._deltas = []

    def _extra_state(self, state: StrategyState) -> None:
        super()._extra_state(state)
        for i, d in enumerate(self._deltas):
            state.arrays[f"buf:{i}"] = d

    def _load_extra(self, state: StrategyState) -> None:
        super()._load_extra(state)
        keys = sorted(int(k[4:]) for k in state.arrays if k.startswith("buf:"))
        self._deltas = [np.array(state.arrays[f"buf:{i}"], dtype=np.float32) for i in keys]


class FedBuffMedian(_RobustFedBuff):
    """FedBuff with the coordinate-wise median of the weighted deltas."""

    name = "fedbuff_median"

    def _reduce(self) -> F32:
        return np.median(np.stack(self._deltas), axis=0).astype(np.float32)


class FedBuffTrimmedMean(_RobustFedBuff):
    """FedBuff with the coordinate-wise trimmed mean (drop ``trim`` fraction per side)."""

    name = "fedbuff_trimmed_mean"

    def __init__(self, params: npt.ArrayLike, *, trim: float = 0.1, **kw: Any) -> None:
        super().__init__(params, **kw)
        if not 0.0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        self.trim = trim

    def _reduce(self) -> F32:
        stacked = np.sort(np.stack(self._deltas), axis=0)
        k = int(self.trim * stacked.shape[0])
        kept = stacked[k : stacked.shape[0] - k]
        out: F32 = np.asarray(kept.mean(axis=0), dtype=np.float32)
        return out
