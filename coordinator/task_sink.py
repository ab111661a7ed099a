"""The task sink: where the selector puts a task it has leased, as a port.

- ``KafkaTaskSink``: produce to ``fl.tasks`` keyed by device (acks=all); the dispatcher
  loop (``coordinator.dispatcher``) consumes the topic and pushes each task over the
  fleet link, so a coordinator that dies between the two loses nothing. The record never
  carries the upload token (``upload_token=""`` whatever the caller passed).
- ``DirectTaskSink``: push straight over the fleet link (``dispatch_record``), no Kafka in
  between: for tests and benchmarks that drive the selector without a broker.

Tasks are handed to a sink without their token (``coordinator.issuing``). Both sinks hold
one contract (``tests/test_coord_link_contract.py``): a task sent reaches its device's
``fleet/<id>/task`` topic once, as the encoded ``Task`` with its token derived from the
task key (``dispatcher.with_token``); a task whose lease is already over is not pushed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from coordinator.dispatcher import Publish, dispatch_record
from coordinator.metrics import CoordinatorMetrics
from schemas.messages import Task, encode


class TaskSink(Protocol):
    async def send(self, task: Task) -> None:
        """Hand ``task`` on for delivery; raises if it could not be (the caller rolls the
        lease back)."""
        ...


# builds a sink from what pushes to devices and the task key; ``DirectTaskSink`` is one
TaskSinkFactory = Callable[[Publish, CoordinatorMetrics, bytes], TaskSink]


class KafkaTaskSink:
    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, task: Task) -> None:
        if task.upload_token:  # a token never reaches Kafka (the dispatcher derives it)
            task = msgspec.structs.replace(task, upload_token="")
        await self.producer.send_and_wait(
            self.topic, value=encode(task), key=task.device_id.encode()
        )


class DirectTaskSink:
    def __init__(self, publish: Publish, metrics: CoordinatorMetrics, key: bytes | None) -> None:
        self.publish = publish
        self.metrics = metrics
        self.key = key  # the task key the token is derived with (None: nothing is pushed)

    async def send(self, task: Task) -> None:
        await dispatch_record(encode(task), self.publish, self.metrics, key=self.key)
