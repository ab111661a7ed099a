"""``SessionLink``: the reconnecting session shared by every ``DeviceLink`` adapter.

One task connects through a ``Connector``, subscribes, publishes ``hello``, runs the
owner's ``on_connect``, reads messages into ``on_message`` and runs the per-connection
``loops`` until the connection drops or ``stop()`` is called; after a drop it waits an
exponential backoff with jitter and connects again. On ``stop()`` it publishes
``farewell`` (the will is not sent on a clean disconnect) and leaves.

Shutdown is cancellation-safe: a cancelled ``stop()`` does not cancel the session's own
shutdown, and ``cancel_all`` retrieves the outcome of every task it cancels, also of one
that finishes only after its caller gave up (a reader ending with ``LinkError`` once the
connection closes under it), so asyncio never logs "Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from edge_agent.execution import backoff_delay
from edge_agent.link import LinkCallbacks, LinkConfig, LinkError, Message
from schemas.aio import cancel_all, cancelling

log = logging.getLogger(__name__)


class Connection(Protocol):
    """One live connection of an adapter; every failure is a ``LinkError``."""

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]]) -> None: ...

    async def publish(self, message: Message) -> None: ...

    def messages(self) -> AsyncIterator[Message]: ...

    def abort(self) -> bool:
        """Drop abruptly, without DISCONNECT (the broker sends the will)."""


class Connector(Protocol):
    def connect(self, config: LinkConfig) -> AbstractAsyncContextManager[Connection]:
        """Connect (raising ``LinkError``); leaving the context disconnects cleanly."""


class SessionLink:
    """A ``DeviceLink`` over any ``Connector`` (see the module docstring)."""

    def __init__(
        self, config: LinkConfig, connector: Connector, *, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.connector = connector
        self.callbacks = LinkCallbacks()
        self.connects = 0  # successful connections so far
        self._rng = rng or random.Random()
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def bind(self, callbacks: LinkCallbacks) -> None:
        self.callbacks = callbacks

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None and not self._stopping.is_set():
            self._task = asyncio.create_task(self._run(), name=f"link:{self.config.client_id}")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            # not gather(): cancelling this stop() must not cancel the session's shutdown
            await asyncio.wait([self._task])

    async def __aenter__(self) -> SessionLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            await conn.publish(Message(topic, payload, qos, retain))
        except LinkError as exc:
            self.callbacks.on_error("publish")
            log.info("%s: publish to %s failed: %s", self.config.client_id, topic, exc)
            return False
        return True

    def cut(self) -> bool:
        conn = self._conn
        return conn is not None and conn.abort()

    # ----------------------------------------------------------------- the session task

    async def _run(self) -> None:
        c, cb = self.config, self.callbacks
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with self.connector.connect(c) as conn:
                    attempt = 0
                    if c.subscriptions:
                        await conn.subscribe(c.subscriptions)
                    if c.hello is not None:
                        await conn.publish(c.hello())
                    self._conn = conn
                    self.connects += 1
                    self._connected.set()
                    await cb.on_connect()
                    await self._serve(conn)
            except LinkError as exc:
                if cancelling():  # the disconnect of a cancelled session failed: stop
                    raise asyncio.CancelledError from exc
                if exc.code == "not_authorized":
                    # a wrong or revoked credential: retrying soon cannot help; keep
                    # trying at the slowest pace (an operator may enrol it again)
                    cb.on_error("not_authorized")
                    if attempt < 30:
                        log.warning("%s: the broker refuses this device's credential (%s); "
                                    "revoked? enrol again (fedfleet agent enrol)",
                                    c.client_id, exc)  # fmt: skip
                    attempt = 30
                else:
                    cb.on_error("mqtt")
                    log.info("%s: session lost: %s", c.client_id, exc)
            except Exception:  # never let the session die on a bug in a handler
                if cancelling():
                    raise asyncio.CancelledError from None
                cb.on_error("internal")
                log.exception("%s: session error", c.client_id)
            finally:
                self._conn = None
                self._connected.clear()
            if self._stopping.is_set():
                break
            delay = backoff_delay(attempt, c.reconnect_min_s, c.reconnect_max_s, self._rng)
            attempt = min(attempt + 1, 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _serve(self, conn: Connection) -> None:
        loops = [asyncio.create_task(self._read(conn))]
        loops += [asyncio.create_task(loop()) for loop in self.callbacks.loops]
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([*loops, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t is stop else t.exception()
                if exc is not None:
                    raise exc
            farewell = self.config.farewell
            if stop in done and farewell is not None:  # clean shutdown: no will, say so
                with contextlib.suppress(LinkError):
                    await conn.publish(farewell())
        finally:
            self._conn = None
            await cancel_all([*loops, stop])

    async def _read(self, conn: Connection) -> None:
        async for message in conn.messages():
            try:
                await self.callbacks.on_message(message)
            except Exception:
                self.callbacks.on_error("internal")
                log.exception("%s: handler for %s failed", self.config.client_id, message.topic)
