"""Shared fixtures: one real broker stack (Kafka KRaft, Mosquitto, Redis) per test session.

The stack is started by `stack.LocalStack` on free loopback ports and torn down at
the end of the session. With FEDFLEET_REQUIRE_REAL=1 (CI) a missing real server is an error;
otherwise a pip fallback may be used. Integration tests isolate themselves with unique topic
and key prefixes (`unique_prefix`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from stack import LocalStack, StackInfo, StackSettings
from stack.errors import StackError
from stack.launcher import env_require_real
from stack.redis_cluster import RedisCluster

# Shared, loaded CI machines: correctness only, never per-example time limits.
settings.register_profile(
    "fedfleet", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fedfleet"))


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    heap = int(os.environ.get("FEDFLEET_KAFKA_HEAP_MB", "512"))
    settings = StackSettings.from_env(kafka_heap_mb=heap)
    launcher = LocalStack(settings, log=lambda m: print(f"[stack] {m}"))
    info = launcher.start()
    print(f"[stack] {info.describe()}")
    try:
        yield info
    finally:
        launcher.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster (``stack.redis_cluster``) for the whole session; its
    URL is ``redis+cluster://...`` (``coordinator.redis_client``). Skipped without
    redis-server, except under FEDFLEET_REQUIRE_REAL=1 (CI), where that is an error."""
    try:
        cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    except StackError as exc:
        if env_require_real():
            raise
        pytest.skip(str(exc))
    cluster.start()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A fresh prefix for Kafka topics / Redis keys / job ids, e.g. 't3f9a1c.'."""
    return f"t{uuid.uuid4().hex[:8]}."


def _dump_asyncio_tasks(test_id: str) -> None:
    """Print every unfinished asyncio task's stack: pytest-timeout shows threads only, and
    a hung async test is one coroutine awaiting something (found via gc: no private API)."""
    tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    print(f"+++ {test_id}: {len(tasks)} unfinished asyncio tasks +++", file=sys.stderr)
    for t in tasks:
        try:
            t.print_stack(limit=12, file=sys.stderr)
        except Exception as exc:  # a frame changing under us: keep dumping the rest
            print(f"  {t.get_name()}: {exc!r}", file=sys.stderr)


@pytest.fixture(autouse=True)
def asyncio_task_dump_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """Shortly before pytest-timeout fires, dump the asyncio tasks of a hung test."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(
        request.config.getini("timeout") or 0
    )
    if limit <= 0:
        yield
        return
    timer = threading.Timer(max(limit - 30.0, limit * 0.9), _dump_asyncio_tasks,
                            args=(request.node.nodeid,))  # fmt: skip
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
