"""Bounded history of a shard's published slices (exact FedAsync needs x_tau)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from aggregator.strategies.base import F32


class VersionHistory:
    """Keeps copies of versions ``v`` with ``v % keep_every == 0``, at most ``capacity``."""

    def __init__(self, *, keep_every: int = 1, capacity: int = 16) -> None:
        if keep_every < 1 or capacity < 1:
            raise ValueError("keep_every and capacity must be >= 1")
        self.keep_every = keep_every
        self.capacity = capacity
        self._slices: OrderedDict[int, F32] = OrderedDict()

    def record(self, version: int, params: F32) -> None:
        """Remember ``params`` as ``version`` if the policy keeps it; evict the oldest."""
        if version % self.keep_every != 0:
            return
        self._slices[version] = params.copy()
        self._slices.move_to_end(version)
        while len(self._slices) > self.capacity:
            self._slices.popitem(last=False)

    def get(self, version: int) -> F32 | None:
        return self._slices.get(version)

    def versions(self) -> list[int]:
        return list(self._slices)

    def items(self) -> list[tuple[int, F32]]:
        return list(self._slices.items())

    def replace(self, items: list[tuple[int, F32]]) -> None:
        self._slices = OrderedDict(
            (v, np.array(a, dtype=np.float32, copy=True)) for v, a in sorted(items)
        )
