"""``MultiFleetLink``: one ``FleetLink`` over several brokers (``schemas.brokers``).

A fleet too large for one Mosquitto (20,000 open files per process) is spread over N
brokers, each device on its home broker (a hash of its id) or, while that one is down, the
next in its failover order. The coordinator holds one link per broker (``MqttFleetLink``:
its own session, reconnects and shared subscriptions, so several coordinators still split
each broker's load) and serves all of them into the same handler.

A device-bound publish goes to the broker the device was last heard on (remembered at
ingest, in a bounded most-recently-heard map), else to the first broker of its failover
order whose session is up; a device that moved after a failover is reached where it is.

Readiness: every broker's session is up. A coordinator that lost one broker keeps ingesting
from the others and reconnecting, but ``/readyz`` says it is not whole (its devices on that
broker are served by the coordinators that still reach it, through the shared
subscriptions).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence

from coordinator.errors import CoordinatorError
from coordinator.link import FleetLink, Handler
from schemas.aio import cancel_all
from schemas.brokers import failover_order

MAX_REMEMBERED = 1_000_000  # devices whose last broker is kept (~100 B each)


def device_of(topic: str) -> str:
    """The device id of a canonical ``fleet/<id>/<leaf>`` topic ("" for any other)."""
    parts = topic.split("/")
    return parts[1] if len(parts) == 3 else ""


class MultiFleetLink:
    """``FleetLink`` over ``links`` (one per broker, in the deployment's broker order)."""

    def __init__(self, links: Sequence[FleetLink], *, max_remembered: int = MAX_REMEMBERED) -> None:
        if not links:
            raise ValueError("MultiFleetLink needs at least one link")
        self.links = list(links)
        self.max_remembered = max_remembered
        self._last: OrderedDict[str, int] = OrderedDict()  # device -> broker index

    # ---------------------------------------------------------------- FleetLink
    def ready(self) -> bool:
        return all(link.ready() for link in self.links)

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for i, link in enumerate(self.links):
            try:
                await link.wait_ready(max(0.0, deadline - time.monotonic()))
            except CoordinatorError as exc:
                raise CoordinatorError("mqtt", f"broker {i}: {exc.detail}") from None

    async def serve(self, handler: Handler) -> None:
        tasks = [asyncio.create_task(link.serve(self._tagged(i, handler)), name=f"mqtt-{i}")
                 for i, link in enumerate(self.links)]  # fmt: skip
        try:
            # a link's serve runs until cancelled: the first one to end (an error) ends all
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            await cancel_all(tasks)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        await self.links[self.broker_index(device_of(topic))].publish(topic, payload, qos)

    # ---------------------------------------------------------------- routing
    def broker_index(self, device_id: str) -> int:
        """Where a message to ``device_id`` goes: the broker it was last heard on while
        that one is up, else the first of its failover order that is up, else its home."""
        n = len(self.links)
        last = self._last.get(device_id)
        if last is not None and self.links[last].ready():
            return last
        order = failover_order(device_id, n) if device_id else list(range(n))
        return next((i for i in order if self.links[i].ready()), order[0])

    def heard(self, device_id: str, index: int) -> None:
        """``device_id`` spoke on broker ``index``."""
        last = self._last
        if last.get(device_id) == index:
            last.move_to_end(device_id)
            return
        last[device_id] = index
        last.move_to_end(device_id)
        while len(last) > self.max_remembered:
            last.popitem(last=False)

    def _tagged(self, index: int, handler: Handler) -> Handler:
        async def on_message(topic: str, payload: bytes) -> None:
            dev = device_of(topic)
            if dev and not topic.endswith("/status"):  # a retained status may be stale
                self.heard(dev, index)
            await handler(topic, payload)

        return on_message


__all__ = ["MultiFleetLink", "device_of"]
