"""``SessionLink`` shutdown and ``cancel_all``: every task's outcome is retrieved, also when
the caller gives up (no "Task exception was never retrieved" on a disconnect)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.link import LinkCallbacks, LinkConfig, LinkError, Message
from edge_agent.memory_link import MemoryBroker, MemoryLink
from schemas.aio import cancel_all


@contextlib.contextmanager
def unretrieved(marker: str) -> Iterator[list[str]]:
    """Collect the loop's "... exception was never retrieved" reports of ``LinkError``s
    whose text holds ``marker`` (garbage is collected before the block ends)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[str] = []

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, LinkError) and marker in str(exc):
            seen.append(f"{context.get('message')}: {exc!r}")
        elif previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield seen
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


async def test_cancel_all_retrieves_a_task_that_outlives_a_cancelled_call() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # as asyncio.wait_for on 3.11 can swallow a cancel
            await release.wait()
        raise LinkError("mqtt", "stubborn reader")

    with unretrieved("stubborn reader") as seen:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        caller = asyncio.create_task(cancel_all([task]))
        await asyncio.sleep(0.01)
        caller.cancel()  # whoever was cancelling the task gives up
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()
        await asyncio.wait([task])
        assert task.done() and not task.cancelled()  # failed (not looked at here)
        del task, caller
    assert seen == []


async def test_cancel_all_waits_out_and_retrieves_failed_tasks() -> None:
    async def fails() -> None:
        raise LinkError("mqtt", "failed loop")

    with unretrieved("failed loop") as seen:
        tasks = [asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(30))]
        await asyncio.sleep(0)
        await cancel_all(tasks)
        assert tasks[1].cancelled() and all(t.done() for t in tasks)
        del tasks
    assert seen == []


async def test_a_cancelled_stop_leaves_no_unretrieved_reader_on_a_lost_connection() -> None:
    """The noise once seen in the e2e log: ``stop()`` is cancelled while the session waits
    for its reader (busy in a handler), the connection is lost meanwhile, and the reader
    ends with ``LinkError`` after everyone stopped waiting for it."""
    broker = MemoryBroker()
    link = MemoryLink(LinkConfig(client_id="s1", subscriptions=(("t", 1),)), broker)
    entered, release = asyncio.Event(), asyncio.Event()

    async def on_message(m: Message) -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # a cancel swallowed in a handler's publish
            await release.wait()

    link.bind(LinkCallbacks(on_message=on_message))
    with unretrieved("connection lost") as seen:
        await link.start()
        await link.wait_connected(5)
        broker.publish(Message("t", b"x", 1))
        await entered.wait()
        stopper = asyncio.create_task(link.stop())
        await asyncio.sleep(0.05)  # the session is cancelling its reader, waiting on it
        assert broker.drop("s1")  # the connection is lost under the reader
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        release.set()
        await asyncio.wait_for(link.stop(), 10)  # the session finished its own shutdown
        assert not link.connected and "s1" not in broker.online
        del link, stopper
    assert seen == []
