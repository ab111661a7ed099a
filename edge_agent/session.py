"""One device's MQTT session: last will, online/offline status, subscriptions, reconnect.

The agent plugs in its behaviour as callbacks: ``on_connect(client)`` after the session is
up, ``on_message(leaf, payload)`` for ``fleet/{id}/<leaf>``, and per-connection ``loops``
(telemetry, outbox re-send) that run while connected and are cancelled on disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiomqtt

from edge_agent.execution import backoff_delay
from edge_agent.settings import AgentSettings
from schemas.messages import DeviceStatus, encode

log = logging.getLogger(__name__)

ClientCallback = Callable[[aiomqtt.Client], Coroutine[Any, Any, None]]


class DeviceSession:
    def __init__(
        self,
        settings: AgentSettings,
        rng: random.Random,
        *,
        on_connect: ClientCallback,
        on_message: Callable[[str, bytes], Awaitable[None]],
        loops: list[ClientCallback],
        on_error: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self._rng = rng
        self._on_connect = on_connect
        self._on_message = on_message
        self._loops = loops
        self._on_error = on_error
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    def _status(self, state: str, reason: str = "") -> bytes:
        return encode(
            DeviceStatus(
                device_id=self.settings.device_id,
                state=state,  # type: ignore[arg-type]
                ts=time.time(),
                reason=reason,
            )
        )

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            s.mqtt_host,
            s.mqtt_port,
            username=s.mqtt_username or None,
            password=s.mqtt_password or None,
            identifier=f"fedfleet-agent-{s.device_id}",
            will=aiomqtt.Will(s.topic("status"), self._status("offline", "lost"), 1, True),
            clean_session=False,  # QoS 1 tasks/acks queued while we are away
            keepalive=s.mqtt_keepalive_s,
            timeout=10.0,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Connect, serve, reconnect with backoff + jitter, until ``stopping`` is set."""
        s = self.settings
        attempt = 0
        while not stopping.is_set():
            try:
                async with self._make_client() as client:
                    attempt = 0
                    await client.subscribe(
                        [(s.topic("task"), 1), (s.topic("ack"), 1), (s.topic("pace"), 0)]
                    )
                    await client.publish(s.topic("status"), self._status("online"), 1, True)
                    self.client = client
                    self.connected.set()
                    await self._on_connect(client)
                    await self._serve(client, stopping)
            except aiomqtt.MqttError as exc:
                self._on_error("mqtt")
                log.info("%s: MQTT session lost: %s", s.device_id, exc)
            except Exception:  # never let the session die on a bug in a handler
                self._on_error("internal")
                log.exception("%s: session error", s.device_id)
            finally:
                self.client = None
                self.connected.clear()
            if stopping.is_set():
                break
            delay = backoff_delay(attempt, s.reconnect_min_s, s.reconnect_max_s, self._rng)
            attempt = min(attempt + 1, 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    async def _serve(self, client: aiomqtt.Client, stopping: asyncio.Event) -> None:
        loops = [asyncio.create_task(self._read(client))]
        loops += [asyncio.create_task(loop(client)) for loop in self._loops]
        stop = asyncio.create_task(stopping.wait())
        try:
            done, _ = await asyncio.wait([*loops, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t is stop else t.exception()
                if exc is not None:
                    raise exc
            if stop in done:  # clean shutdown: the will is not sent, say offline ourselves
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(
                        self.settings.topic("status"), self._status("offline", "shutdown"), 1, True
                    )
        finally:
            self.client = None
            await cancel_all([*loops, stop])

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                self._on_error("malformed")
                continue
            leaf = message.topic.value.rsplit("/", 1)[-1]
            try:
                await self._on_message(leaf, bytes(payload))
            except Exception:
                self._on_error("internal")
                log.exception("%s: handler for %s failed", self.settings.device_id, leaf)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Publish on the current connection; ``False`` when down or failed (never raises)."""
        client = self.client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            self._on_error("publish")
            log.info("%s: publish to %s failed: %s", self.settings.device_id, topic, exc)
            return False
        return True


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel and await tasks, re-cancelling: on Python 3.11 ``asyncio.wait_for`` (used by
    aiomqtt) can swallow a cancellation that races with its inner future completing."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieve, so asyncio does not log "never retrieved"
