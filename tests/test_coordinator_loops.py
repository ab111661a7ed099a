"""Supervised loops stop when cancelled, also when a client's shutdown turns the
cancellation into its own error (aiomqtt's disconnect timing out raises ``MqttError``):
before, the coordinator's MQTT loop caught that error, reconnected, and ``stop()`` waited
on it forever (a CI hang)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import supervise
from schemas.aio import cancel_all


class ShutdownFailed(Exception):
    pass


async def test_a_loop_whose_shutdown_fails_still_stops_when_cancelled() -> None:
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    sessions = 0

    async def session_loop() -> None:  # like `async with Client(): async for msg ...`
        nonlocal sessions
        sessions += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ShutdownFailed("disconnect timed out") from None

    task = asyncio.create_task(supervise("mqtt", session_loop, metrics))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_all([task]), 10)
    assert task.cancelled()
    assert sessions == 1  # not restarted
    assert counter_value(metrics.errors, loop="mqtt") == 0


async def test_a_failing_loop_is_counted_and_restarted() -> None:
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("boom")

    await asyncio.wait_for(supervise("selector", flaky, metrics), 10)
    assert runs == 3
    assert counter_value(metrics.errors, loop="selector") == 2


async def test_cancel_all_retrieves_every_outcome() -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:

        async def fails() -> None:
            raise RuntimeError("lost")

        async def ignores_first_cancel() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(3600)  # swallowed once: re-cancelled a second later

        tasks = [asyncio.create_task(fails()), asyncio.create_task(ignores_first_cancel())]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(cancel_all(tasks), 10)
        assert all(t.done() for t in tasks)
        del tasks
        gc.collect()
        assert not [c for c in seen if "never retrieved" in str(c.get("message", ""))]
    finally:
        loop.set_exception_handler(old)
