"""The fleet link: the coordinator's side of the device messaging, as a port.

``FleetLink`` is what the coordinator needs from MQTT: deliver every device message on the
ingest topics (telemetry, status, task_status, update) to one handler, publish to a
device's topic, and say whether the session is up. Two adapters hold the same contract
(``tests/test_coord_link_contract.py``):

- ``coordinator.mqtt_link.MqttFleetLink``: aiomqtt on a real broker, with reconnects and
  shared subscriptions across coordinators;
- ``MemoryFleetLink`` (here): in-process, for tests and benchmarks that drive the
  coordinator without a broker; a test plays the devices with ``send`` / ``received``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from coordinator.errors import CoordinatorError

Handler = Callable[[str, bytes], Awaitable[None]]

INGEST_LEAVES = ("telemetry", "status", "task_status", "update", "report")
PUBLISH_WAIT_S = 10.0  # how long a publish waits for a lost session to come back


class FleetLink(Protocol):
    def ready(self) -> bool:
        """True while a session is up (``/readyz`` reports it)."""
        ...

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once a session is up; ``CoordinatorError("mqtt")`` after ``timeout_s``."""
        ...

    async def serve(self, handler: Handler) -> None:
        """Deliver every ingest message to ``handler`` until cancelled (reconnecting as
        needed). One message at a time: the handler decides its own concurrency."""
        ...

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish to a device topic; waits up to ``PUBLISH_WAIT_S`` for a session."""
        ...


def is_ingest_topic(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) == 3 and parts[0] == "fleet" and bool(parts[1]) and parts[2] in INGEST_LEAVES


async def wait_event(ev: asyncio.Event, timeout_s: float, what: str) -> None:
    try:
        await asyncio.wait_for(ev.wait(), timeout_s)
    except TimeoutError:
        raise CoordinatorError("mqtt", f"{what}: no MQTT session after {timeout_s:g}s") from None


class MemoryFleetLink:
    """In-process ``FleetLink``. Devices are played by the caller: ``send(topic, payload)``
    is a device publishing (only ingest topics reach the coordinator, as with the MQTT
    filters), ``received(device_id, leaf)`` what the coordinator sent that device.
    It is up while ``serve`` runs."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._up = asyncio.Event()  # as with MQTT: up while ``serve`` runs
        self._serving = 0
        self.published: list[tuple[str, bytes, int]] = []

    # ---------------------------------------------------------------- FleetLink
    def ready(self) -> bool:
        return self._up.is_set()

    async def wait_ready(self, timeout_s: float) -> None:
        await wait_event(self._up, timeout_s, "memory link")

    async def serve(self, handler: Handler) -> None:
        self._serving += 1
        self._up.set()
        try:
            while True:
                topic, payload = await self._inbox.get()
                await handler(topic, payload)
        finally:
            self._serving -= 1
            if not self._serving:
                self._up.clear()

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        await wait_event(self._up, PUBLISH_WAIT_S, f"publish to {topic}")
        self.published.append((topic, bytes(payload), qos))

    # ---------------------------------------------------------------- device side
    def send(self, topic: str, payload: bytes) -> None:
        """A device publishes ``payload`` on ``topic``."""
        if is_ingest_topic(topic):
            self._inbox.put_nowait((topic, bytes(payload)))

    def received(self, device_id: str, leaf: str) -> list[bytes]:
        """Payloads the coordinator published on ``fleet/<device_id>/<leaf>``, in order."""
        want = f"fleet/{device_id}/{leaf}"
        return [p for t, p, _ in self.published if t == want]
