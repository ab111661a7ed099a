"""The broker's credential store, managed by the coordinator (docs/security.md).

``BrokerAdmin`` is the port (enrol a device with a password, revoke it, ask whether the
broker knows it); ``DynsecBrokerAdmin`` is the real adapter (Mosquitto's dynamic-security
plugin over ``$CONTROL``), ``MemoryBrokerAdmin`` the in-memory one; both pass
tests/test_broker_admin.py. ``DynsecClient`` sends ``schemas.dynsec`` commands (aiomqtt):

    async with DynsecClient("127.0.0.1", port, credentials) as admin:
        await admin.run(dynsec.create_client("dev-1", secret))

One MQTT 5 session subscribed to the response topic; ``run`` sends one batch tagged with
a correlation id and waits for the plugin's answer to that batch, then raises
``DynsecError`` if any command failed. Calls are serialised (one batch in flight).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from schemas import dynsec
from schemas.dynsec import DynsecError
from schemas.mqtt_auth import MqttCredentials
from schemas.topics import DEFAULT_ROOT


def _refused(code: int | ReasonCode) -> bool:
    """A SUBACK code of failure (0x80 and up, MQTT 3 and 5 alike)."""
    return int(code.value if isinstance(code, ReasonCode) else code) >= 0x80


class DynsecClient:
    def __init__(
        self, host: str, port: int, credentials: MqttCredentials, *, timeout: float = 10.0
    ) -> None:
        self.host, self.port = host, port
        self.credentials = credentials
        self.timeout = timeout
        self._stack: AsyncExitStack | None = None
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._client is not None:
            return
        stack = AsyncExitStack()
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"dynsec-{secrets.token_hex(4)}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.timeout,
            **self.credentials.client_kwargs(),
        )
        try:
            await stack.enter_async_context(client)
            codes = await client.subscribe(dynsec.RESPONSE_TOPIC, qos=1)
        except BaseException:
            await stack.aclose()
            raise
        if any(_refused(c) for c in codes):
            await stack.aclose()
            raise DynsecError(f"dynsec: {self.credentials.username} may not use $CONTROL")
        self._stack, self._client = stack, client

    async def stop(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> DynsecClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def call(self, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        """The plugin's responses to ``cmds`` (in order), errors included."""
        if self._client is None:
            raise DynsecError("dynsec: client not started")
        tag = secrets.token_hex(8)
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(cmds)]
        async with self._lock:
            await self._client.publish(
                dynsec.CONTROL_TOPIC, json.dumps(dynsec.commands(*tagged)), qos=1
            )
            try:
                return await asyncio.wait_for(self._answer(tag), self.timeout)
            except TimeoutError:
                raise DynsecError(
                    f"dynsec: no answer from {self.host}:{self.port} in {self.timeout:g}s"
                ) from None

    async def run(self, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        """``call`` and raise ``DynsecError`` for the first refused command."""
        replies = await self.call(*cmds)
        dynsec.raise_for_errors(replies)
        return replies

    async def _answer(self, tag: str) -> list[dict[str, Any]]:
        assert self._client is not None
        async for msg in self._client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
            replies = dynsec.responses(bytes(payload))
            if any(str(r.get("correlationData", "")).startswith(f"{tag}-") for r in replies):
                return replies
        raise DynsecError("dynsec: session closed before the answer")


# ------------------------------------------------------------------ the port


class BrokerAdmin(Protocol):
    """Who may connect to the broker, and as what (the coordinator's side of enrolment).

    ``enrol`` lets ``device_id`` in with ``password``, confined to ``fleet/<id>/...``, and
    replaces any earlier credential of that id; ``revoke`` removes it and disconnects its
    live sessions (idempotent); ``has_client`` tells whether the broker knows the id.
    Every failure to reach or command the broker is a ``DynsecError``."""

    async def enrol(self, device_id: str, password: str) -> None: ...

    async def revoke(self, device_id: str) -> None: ...

    async def has_client(self, device_id: str) -> bool: ...


def _missing(reply: dict[str, Any]) -> bool:
    return "not found" in str(reply.get("error", "")).lower()


class DynsecBrokerAdmin:
    """``BrokerAdmin`` on Mosquitto's dynamic-security plugin, over one ``DynsecClient``
    session (opened on first use, re-opened after a failure)."""

    def __init__(self, host: str, port: int, credentials: MqttCredentials, *,
                 timeout: float = 10.0, topic_root: str = DEFAULT_ROOT) -> None:  # fmt: skip
        self._args = (host, port, credentials)
        self.topic_root = topic_root  # enrolled devices' roles name their topics under it
        self._timeout = timeout
        self._client: DynsecClient | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> DynsecBrokerAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()

    async def _call(self, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._lock:
            if self._client is None:
                client = DynsecClient(*self._args, timeout=self._timeout)
                try:
                    await client.start()
                except (aiomqtt.MqttError, OSError) as exc:
                    raise DynsecError(f"dynsec: cannot reach the broker ({exc})") from None
                self._client = client
            try:
                return await self._client.call(*cmds)
            except (aiomqtt.MqttError, OSError, DynsecError) as exc:
                await self._client.stop()
                self._client = None
                if isinstance(exc, DynsecError):
                    raise
                raise DynsecError(f"dynsec: broker session lost ({exc})") from None

    async def enrol(self, device_id: str, password: str) -> None:
        # drop what an earlier enrolment of this id left (absent is fine), then create
        removed = await self._call(*dynsec.revoke_device(device_id))
        dynsec.raise_for_errors(r for r in removed if not _missing(r))
        cmds = dynsec.enrol_device(device_id, password, self.topic_root)
        dynsec.raise_for_errors(await self._call(*cmds))

    async def revoke(self, device_id: str) -> None:
        replies = await self._call(*dynsec.revoke_device(device_id))
        dynsec.raise_for_errors(r for r in replies if not _missing(r))

    async def has_client(self, device_id: str) -> bool:
        (reply,) = await self._call(dynsec.get_client(dynsec.check_device_id(device_id)))
        if _missing(reply):
            return False
        dynsec.raise_for_errors([reply])
        return True


class MemoryBrokerAdmin:
    """``BrokerAdmin`` in a dict (unit tests of enrolment logic): id -> password hash,
    plus the ids whose sessions a revocation would have cut (``kicked``)."""

    def __init__(self) -> None:
        self.clients: dict[str, dict[str, Any]] = {}
        self.kicked: list[str] = []
        self.fail = False  # True: every call raises DynsecError (broker down)

    def _check(self) -> None:
        if self.fail:
            raise DynsecError("dynsec: broker unavailable (memory adapter told to fail)")

    async def enrol(self, device_id: str, password: str) -> None:
        self._check()
        self.clients[dynsec.check_device_id(device_id)] = dynsec.hash_password(password)

    async def revoke(self, device_id: str) -> None:
        self._check()
        if self.clients.pop(dynsec.check_device_id(device_id), None) is not None:
            self.kicked.append(device_id)

    async def has_client(self, device_id: str) -> bool:
        self._check()
        return device_id in self.clients

    def accepts(self, device_id: str, password: str) -> bool:
        entry = self.clients.get(device_id)
        return entry is not None and dynsec.verify_password(entry, password)
