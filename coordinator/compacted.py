"""A keyed, compacted Kafka topic used as a coordinator's durable record: read to its end
at start, tailed after, every value handed to a fold in log order.

The job journal (``coordinator.journal``) and the credential journal
(``coordinator.cred_journal``) are built on it; each keeps its own index (the newest
revision per key) and its own in-memory twin for tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from coordinator.settings import CoordinatorSettings
from schemas.errors import FedfleetError

CATCH_UP_TIMEOUT_S = 30.0

Fold = Callable[[bytes | None], None]


class JournalError(FedfleetError):
    code = "journal"
    retriable = True


def next_revision(current: int | None) -> int:
    """A revision above ``current`` (None: the key is new), taken from the wall clock so
    that writers of separate processes rarely collide."""
    return max(time.time_ns(), current + 1 if current is not None else 0)


class MemoryLog:
    """``CompactedTopic``'s in-process twin, for tests: instances built over one ``log``
    list see each other's writes (a restarted process reads the list again)."""

    def __init__(self, log: list[bytes] | None, fold: Fold) -> None:
        self.log: list[bytes] = [] if log is None else log
        self.fold = fold
        self._read = 0

    def catch_up(self) -> None:
        for value in self.log[self._read :]:
            self.fold(value)
        self._read = len(self.log)

    def put(self, value: bytes) -> None:
        self.catch_up()
        self.log.append(value)
        self.catch_up()


class CompactedTopic:
    """One partition of a compacted topic. ``start`` reads it to its end (so what was
    recorded before this process started is known before it serves); ``run`` tails it;
    ``put`` writes with acks from the producer's settings and folds the value at once."""

    def __init__(self, s: CoordinatorSettings, producer: Any, topic: str, fold: Fold,
                 *, name: str) -> None:  # fmt: skip
        self.s, self.producer, self.topic, self.fold = s, producer, topic, fold
        self.name = name
        self._consumer: AIOKafkaConsumer | None = None
        self._tp = TopicPartition(topic, 0)

    async def start(self) -> None:
        c = AIOKafkaConsumer(
            **self.s.kafka_kwargs(), group_id=None, enable_auto_commit=False,
            client_id=f"{self.s.client_id}-{self.name}",
        )  # fmt: skip
        await c.start()
        self._consumer = c
        c.assign([self._tp])
        await c.seek_to_beginning(self._tp)
        await self.catch_up()

    async def stop(self) -> None:
        if self._consumer is not None:
            c, self._consumer = self._consumer, None
            await asyncio.wait_for(c.stop(), 30)

    async def catch_up(self) -> None:
        """Read every record written so far (bounded: ``JournalError`` if Kafka stalls)."""
        c = self._consumer
        assert c is not None, "start() first"
        end = (await c.end_offsets([self._tp]))[self._tp]
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while await c.position(self._tp) < end:
            if time.monotonic() > deadline:
                raise JournalError("catch_up", f"could not read {self.topic} to offset {end}")
            for recs in (await c.getmany(self._tp, timeout_ms=200)).values():
                for r in recs:
                    self.fold(r.value)

    async def run(self) -> None:
        c = self._consumer
        assert c is not None, "start() first"
        while True:
            for recs in (await c.getmany(self._tp, timeout_ms=1000)).values():
                for r in recs:
                    self.fold(r.value)

    async def put(self, key: str, value: bytes) -> None:
        await self.producer.send_and_wait(self.topic, value=value, key=key.encode())
        self.fold(value)  # our own write is known at once (the tail sees it again)


class OnTopic:
    """Base of a journal kept on a ``CompactedTopic`` (``self.log``): its lifecycle."""

    log: CompactedTopic

    async def start(self) -> None:
        await self.log.start()

    async def stop(self) -> None:
        await self.log.stop()

    async def catch_up(self) -> None:
        await self.log.catch_up()

    async def run(self) -> None:
        await self.log.run()
