"""Dispatcher: consume ``fl.tasks`` (consumer group) and push each ``Task`` over MQTT QoS 1.

Records on ``fl.tasks`` carry no upload token (``upload_token=""``): the dispatcher derives
it from the task id with the deployment's task key (``coordinator.tasks.derive_token``) and
fills it in right before publishing to the device's own ``fleet/{device}/task`` topic, so
a token exists only in that one MQTT message. Offsets are committed after the publish, so
a crash re-pushes (devices treat a known task id as a no-op). Malformed records, and every
record while the dispatcher has no usable key (``no_task_key``), are counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiokafka import AIOKafkaConsumer

from coordinator.metrics import CoordinatorMetrics
from coordinator.tasks import TASK_KEY_BYTES, derive_token
from schemas.aio import cancelling
from schemas.errors import SchemaError
from schemas.messages import Task, decode, encode

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]


def with_token(task: Task, key: bytes) -> Task:
    """``task`` as its device receives it: the upload token derived from its id."""
    return msgspec.structs.replace(task, upload_token=derive_token(key, task.task_id))


async def dispatch_record(
    value: bytes, publish: Publish, metrics: CoordinatorMetrics, now: float | None = None,
    *, key: bytes | None,
) -> bool:  # fmt: skip
    """Push one ``fl.tasks`` record to its device, its token filled in from ``key`` (any
    token the record carries is replaced); False if it was skipped (counted)."""
    try:
        task = decode(value, Task)
    except SchemaError as exc:
        metrics.rejected.labels(source="fl.tasks", reason=exc.reason).inc()
        return False
    if task.deadline_ts <= (time.time() if now is None else now):
        # Replayed history (new consumer group, rewind): the lease is already over.
        metrics.rejected.labels(source="fl.tasks", reason="past_deadline").inc()
        return False
    if key is None or len(key) != TASK_KEY_BYTES:
        metrics.rejected.labels(source="fl.tasks", reason="no_task_key").inc()
        return False
    await publish(f"fleet/{task.device_id}/task", encode(with_token(task, key)), 1)
    metrics.tasks_dispatched.inc()
    return True


async def run_dispatcher(
    consumer: AIOKafkaConsumer, publish: Publish, metrics: CoordinatorMetrics,
    key: bytes | None,
) -> None:  # fmt: skip
    async for rec in consumer:
        try:
            if rec.value is not None:
                await dispatch_record(rec.value, publish, metrics, key=key)
            await consumer.commit()
        except Exception:
            if cancelling():
                raise asyncio.CancelledError from None
            metrics.errors.labels(loop="dispatcher").inc()
            log.exception("dispatch failed; the task's lease will expire and be re-issued")
