"""``DynsecClient``: send ``stack.dynsec`` commands to a broker's ``$CONTROL`` API (aiomqtt).

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
from typing import Any

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from stack import dynsec
from stack.errors import DynsecError
from stack.mqtt import MqttCredentials


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
