"""Small asyncio helpers every service uses (standard library only)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel and await ``tasks``, re-cancelling every second until all are done.

    Re-cancelling matters: on Python 3.11 ``asyncio.wait_for`` can swallow a cancellation
    that races with its inner future, and a client's ``__aexit__`` that raises its own
    error during a cancellation (aiomqtt's disconnect timing out raises ``MqttError``)
    turns the ``CancelledError`` into an error a reconnect loop would catch and retry.

    Outcomes are discarded but always retrieved (so asyncio never logs "Task exception was
    never retrieved"), also for a task that only finishes after this call was cancelled.
    """
    tasks = list(tasks)
    try:
        pending = {t for t in tasks if not t.done()}
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
    finally:
        for t in tasks:
            if t.done():
                _retrieve(t)
            else:
                t.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def cancelling() -> bool:
    """True if the current task has a cancellation requested (a loop that catches a
    library's error must re-raise instead of retrying when this holds)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
