"""``Wheel``: the lean devices' shared timer schedule (``sim.lean``), one per process.

Time is cut into slots of ``tick_s``; one event-loop callback per slot wakes every item
filed in it (``fire(item, now)``, which must not raise). ``at()`` re-files an item; an
entry left behind in an older slot is skipped (lazy removal: an item is in the slot its
``slot`` attribute names). 5,000 devices cost one wake-up per slot instead of one timer
handle each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Slotted(Protocol):
    slot: int  # the wheel slot this item is filed in (-1: none)


S = TypeVar("S", bound=Slotted)


class Wheel(Generic[S]):
    """Slots of ``tick_s`` woken by one loop callback each (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float,
                 fire: Callable[[S, float], None]) -> None:  # fmt: skip
        self.loop, self.tick, self.fire = loop, tick_s, fire
        self._slots: dict[int, list[S]] = {}
        self._next = int(loop.time() / tick_s)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_at((self._next + 1) * self.tick, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def at(self, dev: S, when: float) -> None:
        slot = max(int(when / self.tick), self._next)
        dev.slot = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [dev]
        else:
            bucket.append(dev)

    def _run(self) -> None:
        now = self.loop.time()
        last = int(now / self.tick)
        while self._next <= last:
            slot = self._next
            self._next += 1
            for dev in self._slots.pop(slot, ()):
                if dev.slot == slot:
                    dev.slot = -1
                    self.fire(dev, now)
        self._handle = self.loop.call_at((last + 1) * self.tick, self._run)
