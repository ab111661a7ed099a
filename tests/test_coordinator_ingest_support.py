"""The ingest rig the coordinator ingest tests share: a real Redis, in-memory Kafka/MQTT
stand-ins, the router, selector and upload handler wired as the service wires them; and
helpers that make devices, jobs and updates. (No tests here.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.api import AppState
from coordinator.ingest import Router, TelemetryBatcher
from coordinator.jobs import build_job
from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from coordinator.selector import Selector
from coordinator.tasks import deployment_tag
from coordinator.uploads import UploadHandler
from schemas.messages import (
    JobSpec,
    Task,
    Telemetry,
    Update,
    UpdateChunk,
    UploadAck,
    decode,
    encode,
)
from tests.test_coordinator_support import (  # noqa: F401
    FakeProducer,
    Published,
    frame,
    make_selector,
    make_state,
    redis_url,
)


@dataclass
class Rig:
    state: AppState
    producer: FakeProducer
    published: Published
    router: Router
    selector: Selector
    uploads: UploadHandler
    newest: dict[str, list[int]]  # the shard versions this coordinator "knows", per job
    redis: Any  # the test's own client (decode_responses=True)
    keys: Keys


@pytest.fixture
async def rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:  # noqa: F811
    redis: Any = redis_client(redis_url)
    state, _ = await make_state(redis, tmp_path, f"t{uuid.uuid4().hex[:8]}:")
    producer, published = FakeProducer(), Published()
    s = state.settings.replace(pace_retry_s=5.0)
    selector = make_selector(state, redis, settings=s, producer=producer, publish=published)
    newest: dict[str, list[int]] = {}

    async def newest_versions(spec: JobSpec) -> list[int] | None:
        return newest.get(spec.job_id)

    uploads = UploadHandler(
        tasks=state.tasks,
        jobs=state.jobs,
        fleet=state.fleet,
        stats=state.stats,
        producer=producer,
        updates_topic=s.updates_topic,
        publish=published,
        metrics=state.metrics,
        on_uploaded=selector.wake,
        newest_versions=newest_versions,
        deployment=deployment_tag(s.topic_prefix),
    )
    batcher = TelemetryBatcher(state.fleet, state.metrics, batch=100, interval_s=0.01)
    router = Router(
        fleet=state.fleet,
        tasks=state.tasks,
        stats=state.stats,
        uploads=uploads,
        batcher=batcher,
        metrics=state.metrics,
    )
    keys = Keys(state.settings.key_prefix)
    yield Rig(state, producer, published, router, selector, uploads, newest, redis, keys)
    await redis.aclose()


def tel(dev: str, **kw: object) -> bytes:
    base: dict[str, object] = dict(
        ts=time.time(), battery=90.0, charging=False, network="wifi", metered=False
    )
    base.update(kw)
    return encode(Telemetry(device_id=dev, **base))  # type: ignore[arg-type]


async def add_devices(rig: Rig, n: int, **kw: object) -> None:
    for i in range(n):
        await rig.router.handle(f"fleet/d{i}/telemetry", tel(f"d{i}", **kw))
    await rig.router.batcher.flush()


async def make_job(
    rig: Rig, concurrency: int = 2, shards: int = 2, selection: dict[str, object] | None = None
) -> str:
    job = build_job(
        {
            "model_name": "m",
            "shards": shards,
            "concurrency": concurrency,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
            "selection": selection or {},
        }
    )
    await rig.state.jobs.put(job)
    return job.spec.job_id


def tasks_sent(rig: Rig) -> list[Task]:
    return [decode(v, Task) for t, v, _, _ in rig.producer.sent if t.endswith("tasks")]


def update_for(task: Task, bounds: list[int], **kw: object) -> Update:
    chunks = [
        UpdateChunk(
            shard=s,
            start=bounds[s],
            stop=bounds[s + 1],
            base_version=0,
            payload=frame(bounds[s + 1] - bounds[s], s),
        )
        for s in range(len(bounds) - 1)
    ]
    base: dict[str, object] = dict(
        update_id=f"u-{task.task_id}",
        task_id=task.task_id,
        job_id=task.job_id,
        device_id=task.device_id,
        upload_token=task.upload_token,
        num_samples=10,
        chunks=chunks,
        sent_ts=time.time(),
    )
    base.update(kw)
    return Update(**base)  # type: ignore[arg-type]


def acks(rig: Rig, dev: str) -> list[UploadAck]:
    return [decode(p, UploadAck) for p in rig.published.on(f"{dev}/ack")]


async def make_sync_job(rig: Rig) -> tuple[str, list[int]]:
    """A sync job: rounds of 2, over-selection 1.5 (3 invited), 50 s deadline."""
    sel = {"mode": "sync", "over_selection": 1.5, "round_deadline_s": 50.0}
    jid = await make_job(rig, concurrency=2, selection=sel)
    return jid, (await rig.state.jobs.get(jid)).spec.shard_bounds
