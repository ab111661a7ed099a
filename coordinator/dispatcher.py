"""Dispatcher: consume ``fl.tasks`` (consumer group) and push each ``Task`` over MQTT QoS 1.

Offsets are committed after the publish, so a crash re-pushes (devices treat a known
task id as a no-op). Malformed records are counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer

from coordinator.metrics import CoordinatorMetrics
from schemas.aio import cancelling
from schemas.errors import SchemaError
from schemas.messages import Task, decode

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]


async def dispatch_record(
    value: bytes, publish: Publish, metrics: CoordinatorMetrics, now: float | None = None
) -> bool:
    """Push one ``fl.tasks`` record to its device; False if it was skipped."""
    try:
        task = decode(value, Task)
    except SchemaError as exc:
        metrics.rejected.labels(source="fl.tasks", reason=exc.reason).inc()
        return False
    if task.deadline_ts <= (time.time() if now is None else now):
        # Replayed history (new consumer group, rewind): the lease is already over.
        metrics.rejected.labels(source="fl.tasks", reason="past_deadline").inc()
        return False
    await publish(f"fleet/{task.device_id}/task", value, 1)
    metrics.tasks_dispatched.inc()
    return True


async def run_dispatcher(
    consumer: AIOKafkaConsumer, publish: Publish, metrics: CoordinatorMetrics
) -> None:
    async for rec in consumer:
        try:
            if rec.value is not None:
                await dispatch_record(rec.value, publish, metrics)
            await consumer.commit()
        except Exception:
            if cancelling():
                raise asyncio.CancelledError from None
            metrics.errors.labels(loop="dispatcher").inc()
            log.exception("dispatch failed; the task's lease will expire and be re-issued")
