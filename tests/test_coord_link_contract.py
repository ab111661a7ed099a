"""One contract, two adapters: the coordinator's ``FleetLink`` (aiomqtt on the real
Mosquitto, and ``MemoryFleetLink``) and its ``TaskSink`` (``fl.tasks`` on the real Kafka
plus the dispatcher, and ``DirectTaskSink``) pass the same assertions.

The device side is played by a real aiomqtt client for the MQTT link and by the memory
link's ``send`` / ``received`` for the in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest
from prometheus_client import CollectorRegistry

from coordinator.dispatcher import run_dispatcher, with_token
from coordinator.kafka import ensure_topics, make_producer, start_consumer, stop_quietly
from coordinator.link import INGEST_LEAVES, FleetLink, MemoryFleetLink
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.mqtt_link import MqttFleetLink
from coordinator.settings import CoordinatorSettings
from coordinator.task_sink import DirectTaskSink, KafkaTaskSink, TaskSink
from schemas.messages import Task, decode
from tests.test_coordinator_integration import eventually

pytestmark = pytest.mark.integration
TASK_KEY = bytes(range(32))


class Devices:
    """The device end of a link: publish as a device, read what a device was sent."""

    async def send(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    def received(self, device_id: str, leaf: str) -> list[bytes]:
        raise NotImplementedError


class MemoryDevices(Devices):
    def __init__(self, link: MemoryFleetLink) -> None:
        self.link = link

    async def send(self, topic: str, payload: bytes) -> None:
        self.link.send(topic, payload)

    def received(self, device_id: str, leaf: str) -> list[bytes]:
        return self.link.received(device_id, leaf)


class MqttDevices(Devices):
    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got: list[tuple[str, bytes]] = []

    async def run(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
            self.got.append((str(m.topic), bytes(payload)))

    async def send(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)

    def received(self, device_id: str, leaf: str) -> list[bytes]:
        return [p for t, p in self.got if t == f"fleet/{device_id}/{leaf}"]


@dataclass
class Rig:
    link: FleetLink
    devices: Devices
    start_serving: Any
    got: list[tuple[str, bytes]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def rig(kind: str, stack: Any, prefix: str) -> AsyncIterator[Rig]:
    tasks: list[asyncio.Task[Any]] = []
    got: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes) -> None:
        got.append((topic, payload))

    link: FleetLink
    devices: Devices
    async with contextlib.AsyncExitStack() as ex:
        if kind == "memory":
            mem = MemoryFleetLink()
            link, devices = mem, MemoryDevices(mem)
        else:
            link = MqttFleetLink(stack.mqtt_host, stack.mqtt_port, client_id=f"{prefix}c",
                                 share_group=f"{prefix.strip('.')}g")  # fmt: skip
            client = await ex.enter_async_context(
                aiomqtt.Client(stack.mqtt_host, stack.mqtt_port, identifier=f"{prefix}dev")
            )
            await client.subscribe("fleet/+/task", qos=1)
            await client.subscribe("fleet/+/ack", qos=1)
            mdev = MqttDevices(client)
            tasks.append(asyncio.create_task(mdev.run()))
            devices = mdev

        def start_serving() -> None:
            tasks.append(asyncio.create_task(link.serve(handler)))

        try:
            yield Rig(link, devices, start_serving, got)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


@pytest.fixture(params=["mqtt", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_ingest_topics_reach_the_handler_and_nothing_else(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    dev = f"{unique_prefix.strip('.')}-d"
    async with rig(kind, stack, unique_prefix) as r:
        assert not r.link.ready()
        r.start_serving()
        await r.link.wait_ready(30)
        assert r.link.ready()
        sent = [(f"fleet/{dev}/{leaf}", f"{leaf}-bytes".encode()) for leaf in INGEST_LEAVES]
        assert {"telemetry", "status", "task_status", "update", "report"} <= set(INGEST_LEAVES)
        for topic, payload in [(f"fleet/{dev}/other", b"x"), (f"fleet/{dev}/task", b"y")]:
            await r.devices.send(topic, payload)  # not ingest topics: never delivered
        for topic, payload in sent:
            await r.devices.send(topic, payload)

        async def all_in() -> bool:
            return sorted(x for x in r.got if x[0].startswith(f"fleet/{dev}/")) == sorted(sent)

        await eventually(all_in, timeout=30)
        await asyncio.sleep(0.3)  # nothing else trickles in
        assert sorted(x for x in r.got if x[0].startswith(f"fleet/{dev}/")) == sorted(sent)


async def test_publish_reaches_the_device_and_waits_for_a_session(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    dev = f"{unique_prefix.strip('.')}-d"
    async with rig(kind, stack, unique_prefix) as r:
        early = asyncio.create_task(r.link.publish(f"fleet/{dev}/ack", b"early", 1))
        await asyncio.sleep(0.3)
        assert not early.done()  # no session yet: the publish waits for one
        r.start_serving()
        await r.link.wait_ready(30)
        await asyncio.wait_for(early, 15)
        await r.link.publish(f"fleet/{dev}/task", b"\x00task\xff", 1)

        async def both() -> bool:
            return (r.devices.received(dev, "ack") == [b"early"]
                    and r.devices.received(dev, "task") == [b"\x00task\xff"])  # fmt: skip

        await eventually(both, timeout=30)


async def test_wait_ready_fails_with_a_typed_error_when_no_session_comes(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    from coordinator.errors import CoordinatorError

    async with rig(kind, stack, unique_prefix) as r:
        with pytest.raises(CoordinatorError) as e:
            await r.link.wait_ready(0.2)  # serve() never started
        assert e.value.code == "mqtt"


def _task(dev: str, n: int, deadline: float) -> Task:
    return Task(task_id=f"t{n}", job_id="j", device_id=dev, model_name="m",
                upload_token="", issued_ts=deadline - 60, deadline_ts=deadline)  # fmt: skip


async def test_a_sent_task_reaches_its_device_once_and_a_past_lease_never(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    dev = f"{unique_prefix.strip('.')}-d"
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    mem = MemoryFleetLink()
    serving = asyncio.create_task(mem.serve(lambda _t, _p: asyncio.sleep(0)))
    await mem.wait_ready(5)
    s = CoordinatorSettings(kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=unique_prefix,
                            http_port=0)
    async with contextlib.AsyncExitStack() as ex:
        sink: TaskSink
        if kind == "memory":
            sink = DirectTaskSink(mem.publish, metrics, TASK_KEY)
        else:
            await ensure_topics(s)
            producer = make_producer(s)
            await producer.start()
            ex.push_async_callback(stop_quietly, producer)
            consumer = await start_consumer(s, s.tasks_topic, f"{unique_prefix}disp")
            ex.push_async_callback(stop_quietly, consumer)
            loop = asyncio.create_task(run_dispatcher(consumer, mem.publish, metrics, TASK_KEY))
            ex.callback(loop.cancel)
            sink = KafkaTaskSink(producer, s.tasks_topic)
        past, live = _task(dev, 1, time.time() - 1), _task(dev, 2, time.time() + 600)
        await sink.send(past)
        await sink.send(live)

        async def arrived() -> list[bytes]:
            return mem.received(dev, "task")

        got = await eventually(arrived, timeout=60)
        await asyncio.sleep(0.3)
        # as sent, with its token derived from the task key filled in
        assert [decode(b, Task) for b in mem.received(dev, "task")] == [with_token(live, TASK_KEY)]
        assert counter_value(metrics.rejected, source="fl.tasks", reason="past_deadline") == 1
        assert counter_value(metrics.tasks_dispatched) == 1
        assert len(got) == 1
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
