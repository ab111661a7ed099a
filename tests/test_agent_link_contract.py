"""One contract for every ``DeviceLink``: ``MqttLink`` (real Mosquitto from the session
``stack`` fixture, ``integration``) and ``MemoryLink`` (in process) pass the same tests.

``LinkContract`` holds the assertions; a subclass only provides the ``make`` fixture that
builds a link on its transport.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest

from edge_agent.link import LinkCallbacks, LinkConfig, Message
from edge_agent.memory_link import MemoryBroker, MemoryLink, topic_matches
from edge_agent.mqtt_link import MqttLink
from edge_agent.session import SessionLink
from stack import StackInfo


class Make(Protocol):
    def __call__(self, name: str, **config: Any) -> SessionLink: ...


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Recorder:
    """Callbacks that record what a link delivers."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.connects = 0
        self.errors: list[str] = []

    def callbacks(self) -> LinkCallbacks:
        async def on_connect() -> None:
            self.connects += 1

        async def on_message(m: Message) -> None:
            self.messages.append(m)

        return LinkCallbacks(on_connect=on_connect, on_message=on_message,
                             on_error=self.errors.append)  # fmt: skip

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.messages if topic is None or m.topic == topic]


async def started(link: SessionLink) -> Recorder:
    rec = Recorder()
    link.bind(rec.callbacks())
    await link.start()
    await link.wait_connected(10)
    return rec


class LinkContract:
    """The assertions; subclasses override ``make``."""

    @pytest.fixture
    def make(self) -> Make:
        raise NotImplementedError

    @pytest.fixture
    def p(self) -> str:
        return f"c{uuid.uuid4().hex[:8]}"  # topic / client id prefix of one test

    async def test_publish_receive_round_trip(self, make: Make, p: str) -> None:
        sub = make(f"{p}-sub", subscriptions=((f"{p}/x", 1),))
        pub = make(f"{p}-pub")
        rec = await started(sub)
        await started(pub)

        assert await pub.publish(f"{p}/x", b"hello", 1)

        await until(lambda: rec.payloads() == [b"hello"])
        m = rec.messages[0]
        assert (m.topic, m.qos, m.retain, m.leaf) == (f"{p}/x", 1, False, "x")

    async def test_qos1_is_queued_for_a_persistent_session_while_away(
        self, make: Make, p: str
    ) -> None:
        subs = ((f"{p}/q", 1),)
        first = make(f"{p}-sub", subscriptions=subs)
        await started(first)
        await first.stop()  # clean disconnect: the session stays on the broker
        pub = make(f"{p}-pub")
        await started(pub)
        assert await pub.publish(f"{p}/q", b"while-away", 1)

        again = make(f"{p}-sub", subscriptions=subs)  # same client id
        rec = await started(again)

        await until(lambda: b"while-away" in rec.payloads())
        assert [m.qos for m in rec.messages if m.payload == b"while-away"] == [1]

    async def test_subscription_filters(self, make: Make, p: str) -> None:
        sub = make(f"{p}-sub", subscriptions=((f"{p}/+/task", 1), (f"{p}/dev/#", 1)))
        pub = make(f"{p}-pub")
        rec = await started(sub)
        await started(pub)

        for leaf in ("a/task", "a/ack", "dev/x/y", "other", "a/b/task", "dev/end"):
            assert await pub.publish(f"{p}/{leaf}", leaf.encode(), 1)

        await until(lambda: b"dev/end" in rec.payloads())
        assert rec.payloads() == [b"a/task", b"dev/x/y", b"dev/end"]

    async def test_retained_message_reaches_a_late_subscriber(self, make: Make, p: str) -> None:
        pub = make(f"{p}-pub")
        await started(pub)
        assert await pub.publish(f"{p}/status", b"online", 1, retain=True)
        late = make(f"{p}-late", subscriptions=((f"{p}/status", 1),))

        rec = await started(late)

        await until(lambda: rec.payloads() == [b"online"])
        assert rec.messages[0].retain is True
        assert await pub.publish(f"{p}/status", b"", 1, retain=True)  # clear it

    async def test_last_will_on_abrupt_drop_not_on_clean_stop(self, make: Make, p: str) -> None:
        watch = make(f"{p}-watch", subscriptions=((f"{p}/will", 1),))
        rec = await started(watch)
        dev = make(
            f"{p}-dev",
            will=lambda: Message(f"{p}/will", b"lost", 1, False),
            reconnect_min_s=5.0,
            reconnect_max_s=5.0,
        )
        await started(dev)

        assert dev.cut() is True

        await until(lambda: rec.payloads() == [b"lost"])
        await dev.stop()
        calm = make(f"{p}-calm", will=lambda: Message(f"{p}/will", b"calm-lost", 1, False))
        await started(calm)
        await calm.stop()
        assert await watch.publish(f"{p}/will", b"sentinel", 1)
        await until(lambda: b"sentinel" in rec.payloads())
        assert rec.payloads() == [b"lost", b"sentinel"]

    async def test_reconnects_and_resubscribes_after_a_drop(self, make: Make, p: str) -> None:
        dev = make(f"{p}-dev", subscriptions=((f"{p}/in", 1),))
        pub = make(f"{p}-pub")
        rec = await started(dev)
        await started(pub)

        assert dev.cut() is True

        await until(lambda: rec.connects == 2 and dev.connected)
        assert "mqtt" in rec.errors  # the drop was reported
        assert await pub.publish(f"{p}/in", b"after", 1)
        await until(lambda: b"after" in rec.payloads())
        assert dev.connects == 2

    async def test_hello_after_connect_and_farewell_on_stop(self, make: Make, p: str) -> None:
        watch = make(f"{p}-watch", subscriptions=((f"{p}/st", 1),))
        rec = await started(watch)
        dev = make(
            f"{p}-dev",
            hello=lambda: Message(f"{p}/st", b"hi", 1, False),
            farewell=lambda: Message(f"{p}/st", b"bye", 1, False),
        )
        await started(dev)
        await until(lambda: rec.payloads() == [b"hi"])

        await dev.stop()

        await until(lambda: rec.payloads() == [b"hi", b"bye"])

    async def test_start_and_stop_are_idempotent(self, make: Make, p: str) -> None:
        dev = make(f"{p}-dev")
        assert await dev.publish(f"{p}/x", b"early", 0) is False  # not connected yet
        rec = await started(dev)
        await dev.start()
        await dev.wait_connected(5)

        async with dev:
            pass  # __aexit__ stops
        await dev.stop()
        await dev.stop()

        assert rec.connects == 1 and dev.connects == 1
        assert dev.connected is False
        assert dev.cut() is False
        assert await dev.publish(f"{p}/x", b"late", 0) is False

    async def test_a_failing_handler_does_not_kill_the_link(self, make: Make, p: str) -> None:
        dev = make(f"{p}-dev", subscriptions=((f"{p}/in", 1),))
        got: list[bytes] = []
        errors: list[str] = []

        async def on_message(m: Message) -> None:
            if m.payload == b"boom":
                raise RuntimeError("handler bug")
            got.append(m.payload)

        dev.bind(LinkCallbacks(on_message=on_message, on_error=errors.append))
        await dev.start()
        await dev.wait_connected(10)
        pub = make(f"{p}-pub")
        await started(pub)

        assert await pub.publish(f"{p}/in", b"boom", 1)
        assert await pub.publish(f"{p}/in", b"fine", 1)

        await until(lambda: got == [b"fine"])
        assert errors == ["internal"] and dev.connects == 1


def _config(name: str, **kw: Any) -> LinkConfig:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.2)
    return LinkConfig(client_id=name, **kw)


@pytest.mark.integration
class TestMqttLink(LinkContract):
    @pytest.fixture
    async def make(self, stack: StackInfo) -> AsyncIterator[Make]:
        links: list[SessionLink] = []

        def make(name: str, **config: Any) -> SessionLink:
            link = MqttLink(_config(name, **config), host=stack.mqtt_host,
                            port=int(stack.mqtt_port))  # fmt: skip
            links.append(link)
            return link

        yield make
        for link in links:
            await link.stop()


class TestMemoryLink(LinkContract):
    @pytest.fixture
    def broker(self) -> MemoryBroker:
        return MemoryBroker()

    @pytest.fixture
    async def make(self, broker: MemoryBroker) -> AsyncIterator[Make]:
        links: list[SessionLink] = []

        def make(name: str, **config: Any) -> SessionLink:
            link = MemoryLink(_config(name, **config), broker)
            links.append(link)
            return link

        yield make
        for link in links:
            await link.stop()

    async def test_drop_refuses_until_restore(
        self, make: Make, broker: MemoryBroker, p: str
    ) -> None:
        watch = make(f"{p}-watch", subscriptions=((f"{p}/will", 1),))
        rec = await started(watch)
        dev = make(f"{p}-dev", will=lambda: Message(f"{p}/will", b"lost", 1, False))
        dev_rec = await started(dev)

        assert broker.drop(f"{p}-dev") is True

        await until(lambda: rec.payloads() == [b"lost"])
        await until(lambda: dev_rec.errors.count("mqtt") >= 2)  # retries are refused
        assert not dev.connected
        broker.restore(f"{p}-dev")
        await dev.wait_connected(5)
        assert dev.connects == 2


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+/task", "fleet/d/task", True),
        ("a/b", "a/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match
