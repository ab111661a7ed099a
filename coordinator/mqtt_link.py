"""``MqttFleetLink``: the ``FleetLink`` on a real MQTT broker (aiomqtt, MQTT 5).

One session per coordinator instance, re-established with backoff when lost. Telemetry,
task_status and update use a shared subscription (``$share/<group>/...``) so several
coordinators split the load; ``status`` is not shared because brokers do not deliver
retained messages to shared subscriptions (and applying it twice is harmless).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import aiomqtt

from coordinator.link import INGEST_LEAVES, PUBLISH_WAIT_S, Handler, wait_event
from schemas.aio import cancelling
from schemas.mqtt_auth import MqttCredentials
from schemas.topics import DEFAULT_ROOT, check_root, from_wire, to_wire

log = logging.getLogger(__name__)


def subscriptions(share_group: str, root: str = DEFAULT_ROOT) -> list[tuple[str, int]]:
    """Topic filters and their QoS (shared where several coordinators split the load),
    under the deployment's topic ``root``."""
    share = f"$share/{share_group}/" if share_group else ""
    # every ingest leaf; status is retained and read by every coordinator (not shared),
    # telemetry is QoS 0 (the next report replaces a lost one)
    return [
        (f"{'' if leaf == 'status' else share}{root}/+/{leaf}", 0 if leaf == "telemetry" else 1)
        for leaf in INGEST_LEAVES
    ]


class MqttFleetLink:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        share_group: str,
        keepalive_s: int = 30,
        max_queued: int = 100_000,
        credentials: MqttCredentials | None = None,
        topic_root: str = DEFAULT_ROOT,
    ) -> None:
        """``credentials``: username/password over TLS verified against their CA (None:
        anonymous, plain TCP). ``topic_root``: the deployment's MQTT namespace; the
        coordinator's canonical ``fleet/...`` topics are mapped to it here, both ways
        (``schemas.topics``)."""
        self.host, self.port = host, port
        self.auth = credentials.client_kwargs() if credentials is not None else {}
        self.scheme = "mqtts" if credentials is not None else "mqtt"
        # MQTT ids must differ per live session (a restart must not take over the old one)
        self.identifier = f"{client_id}-mqtt-{secrets.token_hex(3)}"
        self.root = check_root(topic_root)
        self.filters = subscriptions(share_group, self.root)
        self.keepalive_s = keepalive_s
        self.max_queued = max_queued
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()

    def ready(self) -> bool:
        return self._up.is_set()

    async def wait_ready(self, timeout_s: float) -> None:
        await wait_event(self._up, timeout_s, f"{self.scheme}://{self.host}:{self.port}")

    async def serve(self, handler: Handler) -> None:
        delay = 0.2
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.identifier,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=self.keepalive_s,
                    max_queued_incoming_messages=self.max_queued,
                    **self.auth,
                ) as client:
                    for flt, qos in self.filters:
                        await client.subscribe(flt, qos=qos)
                    self._client = client
                    self._up.set()
                    delay = 0.2
                    async for msg in client.messages:
                        payload = msg.payload
                        data = payload if isinstance(payload, bytes | bytearray) else b""
                        await handler(from_wire(str(msg.topic), self.root), bytes(data))
            except aiomqtt.MqttError as exc:
                if cancelling():  # the disconnect of a cancelled session failed: stop anyway
                    raise asyncio.CancelledError from exc
                log.warning("MQTT session lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self._up.clear()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        await wait_event(self._up, PUBLISH_WAIT_S, f"publish to {topic}")
        client = self._client
        if client is None:  # lost between the wake-up and here: wait for the next session
            await wait_event(self._up, PUBLISH_WAIT_S, f"publish to {topic}")
            client = self._client
            if client is None:
                raise aiomqtt.MqttError(f"no MQTT session for {topic}")
        await client.publish(to_wire(topic, self.root), payload, qos=qos)
