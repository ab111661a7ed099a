"""One opener for the journals' contract tests (jobs, credentials): each call gives a
fresh journal instance — a restarted process — over the same durable log, in memory or
on the test stack's Kafka."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from coordinator.kafka import ensure_topics, make_producer, stop_quietly
from coordinator.settings import CoordinatorSettings

J = TypeVar("J")
Opener = Callable[[], contextlib.AbstractAsyncContextManager[J]]


@contextlib.asynccontextmanager
async def journals(
    kind: str, stack: Any, prefix: str, *,
    memory: Callable[[list[bytes]], J], kafka: Callable[[CoordinatorSettings, Any], J],
) -> AsyncIterator[Opener[J]]:  # fmt: skip
    if kind == "memory":
        log: list[bytes] = []

        @contextlib.asynccontextmanager
        async def open_memory() -> AsyncIterator[J]:
            yield memory(log)

        yield open_memory
        return
    s = CoordinatorSettings(kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=prefix,
                            http_port=0)  # fmt: skip
    await ensure_topics(s)

    @contextlib.asynccontextmanager
    async def open_kafka() -> AsyncIterator[J]:
        producer = make_producer(s)
        await producer.start()
        j: Any = kafka(s, producer)
        try:
            await j.start()
            yield j
        finally:
            await j.stop()
            await stop_quietly(producer)

    yield open_kafka
