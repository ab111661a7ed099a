"""The secure broker for tests: Mosquitto with the dynamic-security plugin or its password
file, or a skip (a failure under ``FEDFLEET_REQUIRE_REAL=1``, as CI runs), and the MQTT
session helpers the tests of both credential stores share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from schemas.mqtt_auth import MqttCredentials
from stack.mqtt import Mosquitto, dynsec_plugin, mosquitto_binary

GUARD_S = 15.0  # hang guard, never an expectation
V5 = aiomqtt.ProtocolVersion.V5


def require_dynsec() -> None:
    """Skip the test when Mosquitto 2 with its dynamic-security plugin is missing."""
    if mosquitto_binary() is None or dynsec_plugin() is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("FEDFLEET_REQUIRE_REAL=1 but mosquitto/dynsec is not installed")
        pytest.skip("mosquitto 2 with the dynamic-security plugin is not installed")


@contextlib.contextmanager
def secure_mosquitto(workdir: Path, auth: str = "dynsec") -> Iterator[Mosquitto]:
    """A started, ready ``Mosquitto(secure=True, auth=auth)`` below ``workdir``; stopped
    on exit."""
    require_dynsec()
    server = Mosquitto(workdir, secure=True, auth=auth)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def code(rc: object) -> int:
    """A CONNACK/SUBACK reason as an int (aiomqtt gives an enum or an int)."""
    value = getattr(rc, "value", rc)
    assert isinstance(value, int)
    return value


def coordinator(broker: Mosquitto) -> MqttCredentials:
    """The coordinator's credential on a secure broker."""
    assert broker.credentials is not None
    return broker.credentials


def session(broker: Mosquitto, creds: MqttCredentials, **kw: typing.Any) -> aiomqtt.Client:
    """An MQTT 5 session as ``creds`` (TLS to the fleet CA), a fresh client id each time."""
    return aiomqtt.Client(
        broker.host, broker.port, identifier=f"{creds.username}-{uuid.uuid4().hex[:6]}",
        protocol=V5, timeout=GUARD_S, **creds.client_kwargs(), **kw,
    )  # fmt: skip


async def first_message(client: aiomqtt.Client) -> tuple[str, bytes]:
    """The next message the session receives (topic, payload)."""

    async def get() -> tuple[str, bytes]:
        async for msg in client.messages:
            payload = msg.payload
            return str(msg.topic), bytes(payload) if isinstance(payload, bytes) else b""
        raise AssertionError("session ended")

    return await asyncio.wait_for(get(), GUARD_S)
