"""``DeviceLink``: the agent's connection to the broker, as an interface.

A link keeps one device's MQTT-style session alive: it connects, subscribes, announces
itself (``hello``), hands incoming messages to ``on_message``, runs per-connection
``loops`` while connected, reconnects with backoff and jitter after a drop, and on a clean
``stop()`` says goodbye (``farewell``) before disconnecting. An abrupt drop (``cut()``, a
lost radio) makes the broker publish the ``will``.

Adapters in this package, held to one contract test (``tests/test_agent_link_contract.py``):

* ``edge_agent.mqtt_link.MqttLink`` — aiomqtt against a real broker;
* ``edge_agent.memory_link.MemoryLink`` — in-process, on a shared ``MemoryBroker``.

Both are ``SessionLink``s (``edge_agent.session``): the reconnect/serve logic is shared,
an adapter only supplies a ``Connector`` (one connection's subscribe/publish/messages).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.errors import AgentError


@dataclass(frozen=True, slots=True)
class Message:
    """One message on the link (incoming or outgoing)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False

    @property
    def leaf(self) -> str:
        """Last topic level: ``task`` for ``fleet/dev-1/task``."""
        return self.topic.rsplit("/", 1)[-1]


MessageFactory = Callable[[], Message]


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkConfig:
    """What a link needs to know about its session (transport-neutral)."""

    client_id: str
    subscriptions: tuple[tuple[str, int], ...] = ()  # (topic filter, qos)
    will: MessageFactory | None = None  # built afresh for each connection
    hello: MessageFactory | None = None  # published after each (re)connect + subscribe
    farewell: MessageFactory | None = None  # published on a clean stop()
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    persistent: bool = True  # clean_session=False: QoS 1 messages queued while away


async def _nothing() -> None:
    return None


async def _ignore(_msg: Message) -> None:
    return None


def _no_error(_reason: str) -> None:
    return None


@dataclass(slots=True)
class LinkCallbacks:
    """The owner's behaviour, plugged into a link before ``start()``.

    ``on_connect`` runs after each (re)connect; ``loops`` run while connected and are
    cancelled on disconnect; ``on_error(reason)`` counts problems (``mqtt`` = session
    lost, ``publish``, ``malformed``, ``internal``); a handler that raises never kills the
    link.
    """

    on_connect: Callable[[], Awaitable[None]] = _nothing
    on_message: Callable[[Message], Awaitable[None]] = _ignore
    loops: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)
    on_error: Callable[[str], None] = _no_error


class LinkError(AgentError):
    """The connection failed or dropped (retriable: the link reconnects by itself)."""

    code = "link"
    retriable = True


class DeviceLink(Protocol):
    """What ``EdgeAgent`` uses of its connection (see the module docstring)."""

    @property
    def config(self) -> LinkConfig: ...

    def bind(self, callbacks: LinkCallbacks) -> None:
        """Set the owner's callbacks (before ``start()``)."""

    async def start(self) -> None:
        """Launch the connect/serve/reconnect task (idempotent)."""

    async def stop(self) -> None:
        """Publish ``farewell``, disconnect cleanly, end the task (idempotent)."""

    async def __aenter__(self) -> DeviceLink: ...

    async def __aexit__(self, *exc: object) -> None: ...

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self, timeout: float | None = None) -> None: ...

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish on the current connection; ``False`` when down or failed (never raises)."""

    def cut(self) -> bool:
        """Drop the connection abruptly (no DISCONNECT: the broker sends the will); the
        link reconnects with backoff. ``False`` when not connected."""
