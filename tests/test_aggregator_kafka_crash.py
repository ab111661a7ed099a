"""Exactly-once across a kill -9: one of two shard-worker processes is killed mid-stream
and restarted, against a real Kafka broker (``FEDFLEET_TEST_KAFKA`` as in
``test_aggregator_kafka.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.messages import ShardUpdate, StrategyConfig
from tests.reference import rules
from tests.reference.streams import make_job, random_stream, shard_updates
from tests.test_aggregator_kafka_support import (
    create_topics,
    kafka_bootstrap,
    produce,
    read_models,
    ref_for,
    settings_for,
    slice_of,
)

__all__ = ["kafka_bootstrap"]  # a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def _committed(bootstrap: str, group: str, topic: str, parts: int) -> list[int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return [(await c.committed(TopicPartition(topic, p))) or 0 for p in range(parts)]
    finally:
        await c.stop()


async def _wait_members(bootstrap: str, group: str, n: int) -> None:
    """Poll until the consumer group is Stable with ``n`` members."""
    import asyncio

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(600):
            (resp,) = await admin.describe_consumer_groups([group])
            (g,) = resp.to_object()["groups"]
            if g["state"] == "Stable" and len(g["members"]) == n:
                return
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    raise AssertionError(f"group {group} never reached {n} stable members")


async def _wait_versions(bootstrap: str, prefix: str, target: dict[int, int]) -> None:
    """Poll ``{prefix}models`` until every shard announced at least its target version."""
    import asyncio

    got: dict[int, int] = {}
    for _ in range(600):  # condition polling, bounded by the test timeout
        for m in await read_models(bootstrap, prefix):
            got[m.shard] = max(got.get(m.shard, -1), m.version)
        if all(got.get(s, -1) >= v for s, v in target.items()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"versions {got} never reached {target}")


@pytest.mark.slow
async def test_kill9_one_of_two_processes_then_restart_is_exactly_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from aggregator import checkpoint as ck
    from aggregator.checkpoint import FileCheckpointStore

    shards = 4
    job = make_job(
        StrategyConfig(name="fedasync", alpha=0.5),
        shards=shards,
        n_features=200,
        hidden=16,
        publish_every=1,
    )
    # time-bounded cadence: >= 1 version and >= 2 s of stream time (3 records) between
    # regular announcements; a quiet partition announces its newest version after 2 s
    kw: dict[str, Any] = {"ts_step": 0.7, "min_interval": 2.0}
    stream = random_stream(job, 160, seed=21, max_lag=4, dup_every=9, **kw)
    per_shard = {s: shard_updates(job, stream, s, ts_step=0.7) for s in range(shards)}
    n = len(per_shard[0])
    half = n // 2
    step = max(1, (n - half) // 4)

    def ref(s: int, upto: int = n, announced: list[int] | None = None) -> rules.RefResult:
        return ref_for(job, per_shard[s][:upto], s, min_interval=2.0, announced=announced)

    refs = {s: ref(s) for s in range(shards)}
    ref_half = {s: ref(s, half).version for s in range(shards)}
    regular_step: dict[int, int] = {}
    for s in range(shards):
        ann: list[int] = []
        ref(s, half + step, ann)
        regular_step[s] = ann[-1]  # announced by the stream itself, no idle announcement
    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path))
    # checkpoints only every 25 records (no timer): a kill loses uncheckpointed work
    env = dict(
        os.environ,
        FEDFLEET_AGG_MIN_PUBLISH_INTERVAL_S="2.0",
        FEDFLEET_AGG_SESSION_TIMEOUT_MS="6000",
        FEDFLEET_AGG_HEARTBEAT_INTERVAL_MS="1000",
        FEDFLEET_AGG_CHECKPOINT_INTERVAL_S="600",
        FEDFLEET_AGG_CHECKPOINT_EVERY="25",
        FEDFLEET_AGG_POLL_TIMEOUT_MS="100",
    )
    args = [
        sys.executable,
        "-m",
        "aggregator",
        "--kafka-bootstrap",
        kafka_bootstrap,
        "--topic-prefix",
        unique_prefix,
        "--group-id",
        settings.group_id,
        "--checkpoint-dir",
        str(tmp_path),
        "--log-level",
        "WARNING",
    ]
    cwd = str(Path(__file__).resolve().parents[1])

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, cwd=cwd, env=env)

    def interleave(lo: int, hi: int) -> list[ShardUpdate | tuple[int, bytes]]:
        return [per_shard[s][i] for i in range(lo, hi) for s in range(shards)]

    await create_topics(kafka_bootstrap, unique_prefix, shards)
    await produce(kafka_bootstrap, unique_prefix, jobs=[job], updates=interleave(0, half))
    a, b = spawn(), spawn()
    procs = [a, b]
    try:
        await _wait_versions(kafka_bootstrap, unique_prefix, ref_half)
        await _wait_members(kafka_bootstrap, settings.group_id, 2)  # A owns 2 of 4 shards
        await produce(kafka_bootstrap, unique_prefix, updates=interleave(half, half + step))
        await _wait_versions(kafka_bootstrap, unique_prefix, regular_step)
        # mid-stream, with applied but uncheckpointed records (before the 2 s idle flush)
        a.send_signal(signal.SIGKILL)
        a.wait()
        for lo in range(half + step, n, step):
            await produce(kafka_bootstrap, unique_prefix, updates=interleave(lo, min(n, lo + step)))
        a2 = spawn()
        procs.append(a2)
        await _wait_versions(
            kafka_bootstrap, unique_prefix, {s: r.version for s, r in refs.items()}
        )
        for p in (b, a2):
            p.send_signal(signal.SIGTERM)  # graceful: final checkpoint + commit
        for p in (b, a2):
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert (
        await _committed(kafka_bootstrap, settings.group_id, settings.updates_topic, shards)
        == [n] * shards
    )
    store = FileCheckpointStore(tmp_path)
    models = await read_models(kafka_bootstrap, unique_prefix)
    replayed = 0
    for s in range(shards):
        want = refs[s]
        blob = store.load(f"{settings.updates_topic}-{s}")
        assert blob is not None
        cp = ck.loads(blob)
        assert cp.next_offset == n
        (jc,) = cp.jobs
        assert jc.version == want.version == len(want.applied)
        assert jc.applied == len(want.applied)
        np.testing.assert_allclose(np.frombuffer(jc.params, dtype="<f4"), want.x, atol=1e-6, rtol=0)
        # versions re-announced after the crash carry identical slices
        seen: dict[int, np.ndarray] = {}
        for m in (m for m in models if m.shard == s):
            got = slice_of(m)
            if m.version in seen:
                replayed += 1
                np.testing.assert_array_equal(seen[m.version], got)
            seen[m.version] = got
    print(f"versions re-announced after the crash: {replayed}")
    assert replayed > 0  # the killed process really lost uncheckpointed work
