"""Which announced slices a shard must still be able to hand exact FedAsync as ``x_tau``.

Every acknowledged update is applied on every shard of its job: the coordinator refuses a
too-stale base *before* it acknowledges (``coordinator.uploads.check_bases``), and shards
never refuse one afterwards. So a shard must be able to produce every announced slice that
a record still to come may name as its base, however far it fell behind (a shard that was
down while devices kept training on its last announced version catches up on thousands of
records that all name that version).

The coordinator admits a record only if its base is at most ``max_staleness`` versions
behind the newest version of that shard it knew of, and writes that version into the record
(``ShardUpdate.seen_version``). A coordinator learns versions in order and never forgets
them, so the records it writes later name bases ``>= seen - max_staleness`` for a ``seen``
no lower than in its earlier records. :class:`SeenFloor` keeps the lowest ``seen_version``
among the records of the last ``window_s`` seconds of stream time (their ``accepted_ts``),
which covers several coordinators as long as none lags more than ``window_s`` behind the
others on ``fl.models``; slices below ``floor - max_staleness`` may go.

The slices themselves live in the strategy's in-memory history (a bounded cache), then in
``spill`` (evicted before a checkpoint stored them) and in the checkpoint store (one
immutable blob per version): :class:`BaseTier` keeps that bookkeeping. Which tier serves a
base changes only the speed, never the result.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from schemas.types import F32


class SeenFloor:
    """Sliding-window minimum of ``seen_version`` over ``window_s`` of stream time."""

    def __init__(self, window_s: float, entries: list[tuple[float, int]] | None = None) -> None:
        self.window_s = window_s
        # (ts, seen), seen strictly increasing front to back; ts = newest record with it
        self._q: deque[tuple[float, int]] = deque(entries or [])
        self._clock = max((t for t, _ in self._q), default=0.0)

    def observe(self, ts: float, seen: int) -> None:
        seen = max(seen, 0)  # -1: the coordinator knew no version yet; 0 keeps everything
        self._clock = max(self._clock, ts)
        while self._q and self._q[-1][1] >= seen:
            self._q.pop()
        self._q.append((ts, seen))
        horizon = self._clock - self.window_s
        while len(self._q) > 1 and self._q[0][0] < horizon:
            self._q.popleft()

    def lowest(self) -> int | None:
        """The lowest ``seen_version`` still in the window (None before any record)."""
        return self._q[0][1] if self._q else None

    def entries(self) -> list[tuple[float, int]]:
        return list(self._q)


BlobLoader = Callable[[str], bytes | None]


def as_slice(blob: bytes) -> F32:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


class BaseTier:
    """Announced slices outside the in-memory history: spilled ones and stored blobs.

    ``key(v)`` names version ``v``'s blob. :meth:`plan` decides what a checkpoint writes
    and deletes; :meth:`saved` applies it once the checkpoint is durable (a failed write
    changes nothing, so the next attempt plans the same blobs again).
    """

    def __init__(self, key: Callable[[int], str], load: BlobLoader | None) -> None:
        self.key = key
        self.load = load
        self.stored: set[int] = set()  # versions with a blob in the checkpoint store
        self.spill: dict[int, F32] = {}  # evicted from memory before being stored
        self._plan: tuple[set[int], set[int]] | None = None

    def evicted(self, version: int, params: F32) -> None:
        if version not in self.stored:
            self.spill[version] = params

    def get(self, version: int) -> F32 | None:
        got = self.spill.get(version)
        if got is not None:
            return got
        if version in self.stored and self.load is not None:
            blob = self.load(self.key(version))
            if blob is not None:
                return as_slice(blob)
        return None

    def plan(
        self, memory: dict[int, F32], floor: int | None, keep: int
    ) -> tuple[dict[str, bytes], list[str], list[int]]:
        """``(blobs to write, blob keys to delete, cold versions)`` for the next checkpoint.

        Versions below ``floor`` leave the store (not those still in memory, nor ``keep``,
        the newest announced one); ``cold`` lists the stored versions not in memory.
        """
        unsaved = {**self.spill, **memory}
        every = self.stored | unsaved.keys()
        drop = {v for v in every if floor is not None and v < floor} - memory.keys() - {keep}
        new = set(unsaved) - self.stored - drop
        self._plan = (new, drop)
        blobs = {self.key(v): unsaved[v].astype("<f4").tobytes() for v in sorted(new)}
        cold = sorted((self.stored | new) - drop - memory.keys())
        return blobs, [self.key(v) for v in sorted(drop & self.stored)], cold

    def saved(self) -> None:
        if self._plan is None:
            return
        new, drop = self._plan
        self.stored = (self.stored | new) - drop
        for v in new | drop:
            self.spill.pop(v, None)
        self._plan = None

    def failed(self) -> None:
        self._plan = None

    def restore(self, versions: set[int]) -> None:
        self.stored, self.spill, self._plan = set(versions), {}, None
