"""Bounded history of a shard's announced slices (exact FedAsync needs x_tau)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from schemas.types import F32


class VersionHistory:
    """Copies of the slices devices may hold as their base ``x_tau``.

    :meth:`keep` stores a version unconditionally (the shard calls it for every version it
    announces); :meth:`record` stores it only when ``keep_every > 0`` and
    ``v % keep_every == 0`` (standalone use). At most ``capacity`` slices are kept (oldest
    evicted first), and with ``max_age`` set, slices more than ``max_age`` versions behind
    the newest kept one are dropped early: no admissible update can use them.

    Two optional hooks make the history a cache in front of a slower tier (what an
    aggregator shard does, ``aggregator.job_shard.JobShard``): ``on_evict(version, slice)`` sees
    every slice leaving memory, and ``fallback(version)`` is asked for a version memory
    does not hold; a slice it returns is kept again (most recently used).
    """

    def __init__(
        self,
        *,
        keep_every: int = 1,
        capacity: int = 16,
        max_age: int | None = None,
        on_evict: Callable[[int, F32], None] | None = None,
        fallback: Callable[[int], F32 | None] | None = None,
    ):
        if keep_every < 0 or capacity < 1:
            raise ValueError("keep_every must be >= 0 and capacity >= 1")
        self.keep_every = keep_every
        self.capacity = capacity
        self.max_age = max_age
        self.on_evict = on_evict
        self.fallback = fallback
        self._slices: OrderedDict[int, F32] = OrderedDict()

    def record(self, version: int, params: F32) -> None:
        """Remember ``params`` as ``version`` if the automatic policy keeps it."""
        if self.keep_every and version % self.keep_every == 0:
            self.keep(version, params)

    def keep(self, version: int, params: F32) -> None:
        """Remember ``params`` as ``version``; evict what is too old or over capacity."""
        if version in self._slices:
            return
        self._slices[version] = params.copy()
        self._slices.move_to_end(version)
        if self.max_age is not None:
            for v in [v for v in self._slices if v < version - self.max_age]:
                self._evict(v, self._slices.pop(v))
        while len(self._slices) > self.capacity:
            self._evict(*self._slices.popitem(last=False))

    def _evict(self, version: int, params: F32) -> None:
        if self.on_evict is not None:
            self.on_evict(version, params)

    def get(self, version: int) -> F32 | None:
        got = self._slices.get(version)
        if got is not None or self.fallback is None:
            return got
        got = self.fallback(version)
        if got is not None:
            self._slices[version] = got
            self._slices.move_to_end(version)
            while len(self._slices) > self.capacity:
                self._evict(*self._slices.popitem(last=False))
        return got

    def versions(self) -> list[int]:
        return list(self._slices)

    def items(self) -> list[tuple[int, F32]]:
        return list(self._slices.items())

    def replace(self, items: list[tuple[int, F32]]) -> None:
        self._slices = OrderedDict(
            (v, np.array(a, dtype=np.float32, copy=True)) for v, a in sorted(items)
        )
