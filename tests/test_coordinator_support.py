"""Helpers for the coordinator tests: a private redis-server and in-memory adapters.

(No tests here; the module name only keeps it inside the coordinator's test files.)
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from coordinator.api import AppState
from coordinator.fleet import FleetStore
from coordinator.jobs import JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.keys import Keys
from coordinator.lock import RedisLock
from coordinator.metrics import CoordinatorMetrics
from coordinator.registry import ModelRegistry
from coordinator.rounds import RoundStore
from coordinator.selector import Selector
from coordinator.settings import CoordinatorSettings
from coordinator.signing import Signer
from coordinator.task_sink import KafkaTaskSink
from coordinator.tasks import TaskStore, load_task_key
from schemas.messages import JobSpec
from stack.launcher import env_require_real
from stack.redis_cluster import RedisCluster

_METRICS: CoordinatorMetrics | None = None


def metrics() -> CoordinatorMetrics:
    from coordinator.metrics import default_metrics

    global _METRICS
    if _METRICS is None:
        _METRICS = default_metrics()
    return _METRICS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", params=["redis", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis for tests that need only Redis, open with ``coordinator.redis_client``:
    every test runs on a private redis-server (no persistence) and again on the
    session's three-master Redis Cluster (``redis_cluster``, ``tests/conftest.py``), so
    the stores' scripts and transactions are held to one hash slot. Without redis-server
    it skips, except under FEDFLEET_REQUIRE_REAL=1 (CI)."""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        yield cluster.url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        if env_require_real():
            pytest.fail("redis-server not installed (FEDFLEET_REQUIRE_REAL=1)")
        pytest.skip("redis-server not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)


class FakeProducer:
    """In-memory stand-in for AIOKafkaProducer: records what would be produced."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, int | None]] = []
        self.fail = fail

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[None]:
        if self.fail:
            raise RuntimeError("broker down")
        self.sent.append((topic, value, key, partition))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None:
        await (await self.send(topic, value, key, partition))


class Published:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, int]] = []

    async def __call__(self, topic: str, payload: bytes, qos: int) -> None:
        self.items.append((topic, payload, qos))

    def on(self, suffix: str) -> list[bytes]:
        return [p for t, p, _ in self.items if t.endswith(suffix)]


async def make_state(redis: Redis, tmp: Path, prefix: str) -> tuple[AppState, list[JobSpec]]:
    """The REST state on stores over the caller's ``redis`` client (the caller closes it)."""
    r: Any = redis
    settings = CoordinatorSettings(
        redis_prefix=prefix, admin_token="secret",
        model_store_dir=tmp / "models", signing_key_path=tmp / "key",
        task_key_path=tmp / "task.key", max_shards=4,
        telemetry_ttl_s=60.0, lease_s=30.0, http_port=0,
    )  # fmt: skip
    signer = Signer.load_or_create(settings.signing_key_path)
    published: list[JobSpec] = []

    async def publish_job(spec: JobSpec) -> None:
        published.append(spec)

    state = AppState(
        settings=settings,
        fleet=FleetStore(r, prefix, settings.telemetry_ttl_s),
        jobs=JobStore(r, prefix),
        tasks=TaskStore(r, prefix),
        stats=JobStatsStore(r, prefix),
        registry=ModelRegistry(settings.model_store_dir, signer, retention=5),
        signer=signer,
        # its own registry: a test's counters start at 0, also when it runs on both
        # Redis fixtures (``redis_url``) in one session
        metrics=CoordinatorMetrics(registry=CollectorRegistry()),
        publish_job=publish_job,
    )
    return state, published


class RoundTrips:
    """Counts Redis round trips of every client in the process while active: each
    ``send_packed_command`` is one request on the wire (a pipeline or MULTI is one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.n = 0
        orig = AbstractConnection.send_packed_command

        async def counted(conn: Any, *a: Any, **kw: Any) -> None:
            self.n += 1
            await orig(conn, *a, **kw)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def make_selector(state: AppState, r: Redis, **kw: Any) -> Selector:
    """A ``Selector`` over ``state``'s stores (``kw``: producer, publish, settings, ...);
    a ``producer`` (e.g. ``FakeProducer``) becomes the ``KafkaTaskSink`` it writes to."""
    p = state.settings.key_prefix
    producer = kw.pop("producer", None)
    if producer is not None:
        s = kw.get("settings", state.settings)
        kw["task_sink"] = KafkaTaskSink(producer, s.tasks_topic)
    args: dict[str, Any] = dict(
        settings=state.settings, fleet=state.fleet, tasks=state.tasks, jobs=state.jobs,
        rounds=RoundStore(r, p), stats=state.stats, lock=RedisLock(r, Keys(p).selector_lock),
        publish=None, metrics=state.metrics,
        task_key=load_task_key(state.settings.task_key_path),
    )  # fmt: skip
    args.update(kw)
    return Selector(**args)


def frame(length: int, seed: int = 0) -> bytes:
    """A real update frame of ``length`` float32 values (the coordinator decodes frames
    before it acknowledges an upload)."""
    import numpy as np

    from schemas import codec
    from schemas.messages import CodecConfig

    rng = np.random.default_rng(seed)
    vals = (rng.normal(size=length) * 0.01).astype(np.float32)
    return codec.encode(vals, CodecConfig(quant="none"))
