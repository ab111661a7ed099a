"""``MemoryLink``: the in-process ``DeviceLink``, on a shared ``MemoryBroker``.

The broker keeps what the agent relies on from an MQTT 3.1.1 broker: topic filters with
``+``/``#``, QoS 0/1 (a persistent session queues QoS 1 messages while its client is
away), retained messages (sent with ``retain=True`` on subscribe, ``False`` to existing
subscribers, an empty payload clears), the last will on an abrupt drop (not on a clean
disconnect) and session take-over by client id. ``drop(client_id)`` cuts a client and
refuses it until ``restore(client_id)``; ``MemoryLink.cut()`` cuts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from edge_agent.link import LinkConfig, LinkError, Message
from edge_agent.session import SessionLink


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter match (``+`` one level, trailing ``#`` any number, incl. none)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


@dataclass
class _Session:
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: list[Message] = field(default_factory=list)  # QoS 1 while offline


class MemoryConnection:
    """One client's connection to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, config: LinkConfig) -> None:
        self.broker = broker
        self.client_id = config.client_id
        self.will = config.will() if config.will is not None else None
        self.persistent = config.persistent
        self.open = True
        self.lost = False
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()

    def deliver(self, message: Message) -> None:
        if self.open:
            self._inbox.put_nowait(message)

    def close(self, *, lost: bool) -> None:
        if self.open:
            self.open, self.lost = False, lost
            self._inbox.put_nowait(None)

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        self._check()
        self.broker.subscribe(self, subscriptions)

    async def publish(self, message: Message) -> None:
        self._check()
        self.broker.publish(message)
        await asyncio.sleep(0)

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            item = await self._inbox.get()
            if item is None:
                if self.lost:
                    raise LinkError("mqtt", "connection lost")
                return
            yield item

    def abort(self) -> bool:
        return self.broker.abort(self)

    def _check(self) -> None:
        if not self.open:
            raise LinkError("mqtt", "not connected")


class MemoryBroker:
    """A tiny in-process broker that several ``MemoryLink``s share."""

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.online: dict[str, MemoryConnection] = {}
        self.retained: dict[str, Message] = {}
        self.refused: set[str] = set()
        self.published = 0

    # ----------------------------------------------------------------- faults

    def drop(self, client_id: str) -> bool:
        """Cut ``client_id`` abruptly (will sent) and refuse it until ``restore``."""
        self.refused.add(client_id)
        conn = self.online.get(client_id)
        return conn is not None and self.abort(conn)

    def restore(self, client_id: str) -> None:
        self.refused.discard(client_id)

    # ----------------------------------------------------------------- broker side

    def connect(self, config: LinkConfig) -> MemoryConnection:
        if config.client_id in self.refused:
            raise LinkError("mqtt", f"{config.client_id}: connection refused (dropped)")
        old = self.online.get(config.client_id)
        if old is not None:  # take-over: the old connection is dropped
            self.abort(old)
        conn = MemoryConnection(self, config)
        self.online[config.client_id] = conn
        session = self.sessions.get(config.client_id)
        if session is None or not config.persistent:
            session = self.sessions[config.client_id] = _Session()
        queued, session.queued = session.queued, []
        for m in queued:
            conn.deliver(m)
        return conn

    def disconnect(self, conn: MemoryConnection, *, lost: bool) -> None:
        if self.online.get(conn.client_id) is conn:
            del self.online[conn.client_id]
            if not conn.persistent:
                self.sessions.pop(conn.client_id, None)
        was_open = conn.open
        conn.close(lost=lost)
        if lost and was_open and conn.will is not None:
            self.publish(conn.will)

    def abort(self, conn: MemoryConnection) -> bool:
        if not conn.open:
            return False
        self.disconnect(conn, lost=True)
        return True

    def subscribe(self, conn: MemoryConnection, subscriptions: Sequence[tuple[str, int]]) -> None:
        session = self.sessions.setdefault(conn.client_id, _Session())
        for pattern, qos in subscriptions:
            session.subscriptions[pattern] = qos
            for topic, m in self.retained.items():
                if topic_matches(pattern, topic):
                    conn.deliver(Message(topic, m.payload, min(qos, m.qos), True))

    def publish(self, message: Message) -> None:
        self.published += 1
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)
        for client_id, session in self.sessions.items():
            qos = max(
                (q for p, q in session.subscriptions.items() if topic_matches(p, message.topic)),
                default=-1,
            )
            if qos < 0:
                continue
            out = Message(message.topic, message.payload, min(qos, message.qos), False)
            conn = self.online.get(client_id)
            if conn is not None:
                conn.deliver(out)
            elif out.qos >= 1:
                session.queued.append(out)


@dataclass(frozen=True, slots=True)
class MemoryConnector:
    broker: MemoryBroker

    @contextlib.asynccontextmanager
    async def connect(self, config: LinkConfig) -> AsyncIterator[MemoryConnection]:
        conn = self.broker.connect(config)
        await asyncio.sleep(0)
        try:
            yield conn
        finally:
            self.broker.disconnect(conn, lost=False)


class MemoryLink(SessionLink):
    """``SessionLink`` over ``MemoryConnector(broker)``."""

    def __init__(
        self, config: LinkConfig, broker: MemoryBroker, *, rng: random.Random | None = None
    ) -> None:
        self.broker = broker
        super().__init__(config, MemoryConnector(broker), rng=rng)
