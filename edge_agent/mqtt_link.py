"""``MqttLink``: the ``DeviceLink`` over aiomqtt (a real MQTT 3.1.1 broker, e.g. Mosquitto).

``mqtt_link(settings, config)`` builds one from ``AgentSettings``; every ``aiomqtt.MqttError``
becomes a ``LinkError``. ``cut()`` shuts the TCP socket down without DISCONNECT, like a
device losing its radio, so the broker publishes the will.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from edge_agent.link import LinkConfig, LinkError, Message
from edge_agent.session import SessionLink
from schemas import mqtt_auth


class MqttConnection:
    """One connected ``aiomqtt.Client``."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        try:
            await self.client.subscribe(list(subscriptions))
        except aiomqtt.MqttError as exc:
            raise LinkError("mqtt", str(exc)) from exc

    async def publish(self, message: Message) -> None:
        try:
            await self.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
        except aiomqtt.MqttError as exc:
            raise LinkError("publish", str(exc)) from exc

    async def messages(self) -> AsyncIterator[Message]:
        try:
            async for m in self.client.messages:
                payload = m.payload
                if not isinstance(payload, bytes | bytearray):
                    continue  # aiomqtt decodes nothing; other types are not ours
                yield Message(m.topic.value, bytes(payload), int(m.qos), bool(m.retain))
        except aiomqtt.MqttError as exc:
            raise LinkError("mqtt", str(exc)) from exc

    def abort(self) -> bool:
        # aiomqtt exposes no abort: shut paho's socket down under it (the one private reach,
        # kept inside the adapter of the library it belongs to)
        paho: Any = getattr(self.client, "_client", None)
        sock: Any = getattr(paho, "_sock", None) if paho is not None else None
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True


def tls_context(cafile: Path) -> ssl.SSLContext:
    """The broker verified against the fleet CA only (``schemas.mqtt_auth``)."""
    try:
        return mqtt_auth.tls_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise LinkError("tls", f"cannot load the fleet CA {cafile}: {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class MqttConnector:
    host: str
    port: int
    username: str = ""
    password: str = ""
    cafile: Path | None = None  # set: TLS, the broker verified against this CA
    timeout_s: float = 10.0

    @contextlib.asynccontextmanager
    async def connect(self, config: LinkConfig) -> AsyncIterator[MqttConnection]:
        will = None
        if config.will is not None:
            w = config.will()
            will = aiomqtt.Will(w.topic, w.payload, w.qos, w.retain)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username or None,
            password=self.password or None,
            identifier=config.client_id,
            will=will,
            clean_session=not config.persistent,
            keepalive=config.keepalive_s,
            timeout=self.timeout_s,
            tls_context=tls_context(self.cafile) if self.cafile is not None else None,
        )
        try:
            async with client:
                yield MqttConnection(client)
        except MqttConnectError as exc:
            # CONNACK 4/5 (MQTT 3.1.1) or 134/135 (MQTT 5): the broker refuses this
            # credential (wrong, or revoked): not a network fault
            rc = getattr(exc.rc, "value", exc.rc)
            code = "not_authorized" if rc in (4, 5, 134, 135) else "mqtt"
            raise LinkError(code, str(exc)) from exc
        except aiomqtt.MqttError as exc:
            raise LinkError("mqtt", str(exc)) from exc


class FailoverConnector:
    """Connects to the first of ``connectors`` (the device's home broker) and, when a
    connection cannot be made, to the next one on the next attempt (the session link's
    backoff runs in between), round the list. After a session that was up ends, the next
    attempt starts from the home broker again: a device that failed over goes back home
    at its next reconnect (not while its session on the other broker lasts)."""

    def __init__(self, connectors: Sequence[MqttConnector]) -> None:
        if not connectors:
            raise ValueError("FailoverConnector needs at least one broker")
        self.connectors = list(connectors)
        self.current = 0  # index into connectors of the next attempt

    @property
    def broker(self) -> MqttConnector:
        return self.connectors[self.current]

    @contextlib.asynccontextmanager
    async def connect(self, config: LinkConfig) -> AsyncIterator[MqttConnection]:
        entered = False
        try:
            async with self.broker.connect(config) as conn:
                entered = True
                yield conn
        except LinkError:
            if not entered:  # this broker cannot be reached (or refused us): the next one
                self.current = (self.current + 1) % len(self.connectors)
            raise
        finally:
            if entered:
                self.current = 0


class MqttLink(SessionLink):
    """``SessionLink`` over ``MqttConnector`` (over ``FailoverConnector`` when the device
    has ``failover`` brokers: ``schemas.brokers``)."""

    def __init__(
        self,
        config: LinkConfig,
        *,
        host: str,
        port: int,
        username: str = "",
        password: str = "",
        cafile: Path | None = None,
        rng: random.Random | None = None,
        failover: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``host``:``port``: the home broker; ``failover``: the brokers to try next, in
        order (the same credential and CA on each)."""
        connectors = [MqttConnector(host=h, port=p, username=username, password=password,
                                    cafile=cafile)
                      for h, p in [(host, port), *failover]]  # fmt: skip
        connector: MqttConnector | FailoverConnector = (
            connectors[0] if len(connectors) == 1 else FailoverConnector(connectors)
        )
        super().__init__(config, connector, rng=rng)
