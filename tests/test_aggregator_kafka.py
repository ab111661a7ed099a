"""Integration tests of the shard worker against a real Kafka broker.

Set ``FEDFLEET_TEST_KAFKA=host:port`` to reuse a running broker instead of the ``stack``
fixture. Each test uses its own topic prefix, consumer group and checkpoint directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from aggregator.settings import AggregatorSettings
from aggregator.worker import AggregatorWorker
from schemas.codec import frame as fr
from schemas.messages import JobSpec, ShardUpdate, ShardVersion, StrategyConfig, decode, encode
from tests.reference import rules
from tests.reference.streams import init_slice, make_job, random_stream, ref_stream, shard_updates

# ------------------------------------------------------------------ Kafka helpers


async def create_topics(bootstrap: str, prefix: str, shards: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(f"{prefix}jobs", 1, 1, topic_configs={"cleanup.policy": "compact"}),
                NewTopic(
                    f"{prefix}updates",
                    shards,
                    1,
                    topic_configs={"max.message.bytes": str(64 << 20)},
                ),
                NewTopic(
                    f"{prefix}models", 1, 1, topic_configs={"max.message.bytes": str(64 << 20)}
                ),
            ]
        )
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    prefix: str,
    *,
    jobs: Sequence[JobSpec] = (),
    updates: Sequence[ShardUpdate | tuple[int, bytes]] = (),
) -> None:
    """Produce jobs, then updates (a raw ``(partition, bytes)`` tuple for junk), in order."""
    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, max_request_size=64 << 20
    )
    await p.start()
    try:
        for j in jobs:
            await p.send_and_wait(f"{prefix}jobs", encode(j), key=j.job_id.encode())
        futs = []
        for u in updates:
            if isinstance(u, tuple):
                part, raw = u
                futs.append(await p.send(f"{prefix}updates", raw, partition=part))
            else:
                futs.append(
                    await p.send(
                        f"{prefix}updates", encode(u), partition=u.shard, key=u.update_id.encode()
                    )
                )
        for f in futs:
            await f
    finally:
        await p.stop()


async def read_models(bootstrap: str, prefix: str) -> list[ShardVersion]:
    """Every ShardVersion on ``{prefix}models`` so far."""
    tp = TopicPartition(f"{prefix}models", 0)
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=64 << 20,
    )
    await c.start()
    try:
        c.assign([tp])
        await c.seek_to_beginning(tp)
        end = (await c.end_offsets([tp]))[tp]
        out: list[ShardVersion] = []
        while await c.position(tp) < end:
            for rec in (await c.getmany(tp, timeout_ms=1000)).get(tp, []):
                out.append(decode(rec.value, ShardVersion, max_bytes=64 << 20))
        return out
    finally:
        await c.stop()


def slice_of(sv: ShardVersion) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(sv.params)
    return np.frombuffer(raw, dtype="<f4")


def settings_for(bootstrap: str, prefix: str, ckpt_dir: str, **kw: object) -> AggregatorSettings:
    base: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "group_id": f"{prefix}aggs",
        "checkpoint_dir": ckpt_dir,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "poll_timeout_ms": 100,
    }
    base.update(kw)
    return AggregatorSettings(**base)  # type: ignore[arg-type]


pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    env = os.environ.get("FEDFLEET_TEST_KAFKA")
    if env:
        yield env
    else:
        yield request.getfixturevalue("stack").kafka_bootstrap


def ref_for(
    job: JobSpec,
    ups: list[ShardUpdate],
    shard: int,
    *,
    min_interval: float = 0.0,
    announced: list[int] | None = None,
) -> rules.RefResult:
    c = job.strategy
    return rules.fedasync(
        init_slice(job, shard),
        ref_stream(ups),
        alpha=c.alpha,
        staleness=c.staleness,
        a=c.staleness_a,
        b=c.staleness_b,
        keep_every=job.publish_every,
        history_size=None,  # a shard: every announced slice, no bound after the ack
        max_staleness=None,
        min_interval=min_interval,
        announced=announced,
    )


async def test_golden_stream_equals_reference_and_restart_is_idempotent(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    job = make_job(StrategyConfig(name="fedasync", alpha=0.6), publish_every=2)
    stream = random_stream(job, 40, seed=11, max_lag=5, dup_every=6)
    per_shard = {s: shard_updates(job, stream, s) for s in (0, 1)}
    await create_topics(kafka_bootstrap, unique_prefix, 2)
    await produce(
        kafka_bootstrap,
        unique_prefix,
        jobs=[job],
        updates=[u for pair in zip(per_shard[0], per_shard[1], strict=True) for u in pair],
    )
    # min_publish_interval_s=0: the plain publish_every cadence (every even version)
    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path), min_publish_interval_s=0)
    async with AggregatorWorker(settings) as w:
        await w.drain()
        refs = {s: ref_for(job, per_shard[s], s) for s in (0, 1)}
        for s in (0, 1):
            js = w.job_shard(job.job_id, s)
            assert js is not None
            assert js.version == refs[s].version
            np.testing.assert_allclose(js.params, refs[s].x, atol=1e-6, rtol=0)
        applied = w.metrics.value(
            "fedfleet_aggregator_updates_applied_total", shard="0", strategy="fedasync"
        )
        assert applied == len(refs[0].applied)
    models = await read_models(kafka_bootstrap, unique_prefix)
    for s in (0, 1):
        mine = [m for m in models if m.shard == s]
        assert mine[0].version == 0
        assert all(m.version % 2 == 0 for m in mine)
        last = max(mine, key=lambda m: m.version)
        if refs[s].version % 2 == 0:
            np.testing.assert_allclose(slice_of(last), refs[s].x, atol=1e-6, rtol=0)
    # a new worker in the same group resumes from the checkpoints: nothing is re-applied
    async with AggregatorWorker(settings) as w2:
        await w2.drain()
        for s in (0, 1):
            js = w2.job_shard(job.job_id, s)
            assert js is not None and js.version == refs[s].version
            np.testing.assert_allclose(js.params, refs[s].x, atol=1e-6, rtol=0)
        assert (
            w2.metrics.value(
                "fedfleet_aggregator_updates_applied_total", shard="0", strategy="fedasync"
            )
            == 0
        )


async def test_time_bounded_cadence_and_drain_announce_the_final_version(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """publish_every AND min_publish_interval_s of stream time gate the announcements; the
    drain announces the newest version (checkpointed first); a restart re-announces nothing."""
    job = make_job(StrategyConfig(name="fedasync", alpha=0.6), publish_every=2)
    kw: dict[str, Any] = {"ts_step": 0.07, "min_interval": 0.3}
    stream = random_stream(job, 40, seed=12, max_lag=6, dup_every=6, **kw)
    per_shard = {s: shard_updates(job, stream, s, ts_step=0.07) for s in (0, 1)}
    await create_topics(kafka_bootstrap, unique_prefix, 2)
    await produce(kafka_bootstrap, unique_prefix, jobs=[job], updates=per_shard[0] + per_shard[1])
    settings = settings_for(
        kafka_bootstrap, unique_prefix, str(tmp_path), min_publish_interval_s=0.3
    )
    announced: dict[int, list[int]] = {0: [], 1: []}
    refs = {
        s: ref_for(job, per_shard[s], s, min_interval=0.3, announced=announced[s]) for s in (0, 1)
    }
    async with AggregatorWorker(settings) as w:
        await w.drain()
        for s in (0, 1):
            js = w.job_shard(job.job_id, s)
            assert js is not None and js.version == refs[s].version
            assert js.last_published == js.version  # drain announced the newest version
            np.testing.assert_allclose(js.params, refs[s].x, atol=1e-6, rtol=0)
    models = await read_models(kafka_bootstrap, unique_prefix)
    for s in (0, 1):
        got = [m.version for m in models if m.shard == s]
        final = refs[s].version
        expect = announced[s] + ([final] if final != announced[s][-1] else [])
        assert got == expect and len(announced[s]) > 3
        last = max((m for m in models if m.shard == s), key=lambda m: m.version)
        np.testing.assert_allclose(slice_of(last), refs[s].x, atol=1e-6, rtol=0)
    async with AggregatorWorker(settings) as w2:
        await w2.drain()
        assert w2.metrics.value("fedfleet_aggregator_versions_published_total") == 0
    assert len(await read_models(kafka_bootstrap, unique_prefix)) == len(models)


async def test_replaying_the_same_uploads_applies_them_once(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    job = make_job(StrategyConfig(name="fedbuff", buffer_size=3), shards=1)
    stream = random_stream(job, 12, seed=2, max_lag=1)
    ups = shard_updates(job, stream, 0)
    await create_topics(kafka_bootstrap, unique_prefix, 1)
    await produce(kafka_bootstrap, unique_prefix, jobs=[job], updates=ups)
    async with AggregatorWorker(settings_for(kafka_bootstrap, unique_prefix, str(tmp_path))) as w:
        await w.drain()
        js = w.job_shard(job.job_id, 0)
        assert js is not None
        first = js.params.copy()
        await produce(kafka_bootstrap, unique_prefix, updates=ups)  # the replay
        await w.drain()
        np.testing.assert_array_equal(js.params, first)
        assert js.applied == 12
        assert (
            w.metrics.value(
                "fedfleet_aggregator_updates_rejected_total", shard="0", reason="duplicate"
            )
            == 12
        )
        ref = rules.fedbuff(init_slice(job, 0), ref_stream(ups + ups), k=3)
        np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)


def _nan_frame(n: int) -> bytes:
    v = np.zeros(n, dtype="<f4")
    v[1] = np.nan
    return fr.pack(
        quant=0, flags=0, nlow=0, length=n, k=n, scale=1.0, planes=fr.byte_planes(v), level=1
    )


async def test_bad_updates_are_rejected_and_counted(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    job = make_job(StrategyConfig(name="fedasync", max_staleness=2), shards=1)
    n = job.shard_bounds[1]
    good = shard_updates(job, random_stream(job, 6, seed=1, max_lag=0), 0)

    def variant(i: int, **kw: object) -> ShardUpdate:
        fields = {f: getattr(good[0], f) for f in good[0].__struct_fields__}
        fields.update(update_id=f"bad{i}", **kw)
        return ShardUpdate(**fields)

    bad: list[ShardUpdate | tuple[int, bytes]] = [
        (0, b"\x00not msgpack"),
        variant(1, payload=_nan_frame(n)),
        variant(2, payload=b"FFUC" + b"\x00" * 40),
        variant(3, job_id="no-such-job"),
        variant(4, stop=n - 1),
        variant(5, payload=b"\x01" * 5000),  # over max_update_bytes below
        # 6 versions behind a bound of 2: the coordinator would have refused it; once on
        # the log it counts as acknowledged, and shards apply whatever was acknowledged
        variant(6, base_version=0),
        variant(7, base_version=99),
    ]
    await create_topics(kafka_bootstrap, unique_prefix, 1)
    await produce(kafka_bootstrap, unique_prefix, jobs=[job], updates=[*good, *bad, good[0]])
    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path), max_update_bytes=4096)
    async with AggregatorWorker(settings) as w:
        await w.drain()
        js = w.job_shard(job.job_id, 0)
        assert js is not None and js.version == 7
        part = w.partitions[0]
        assert part.rejected == {
            "too_large": 1,
            "non_finite": 1,
            "codec": 1,
            "unknown_job": 1,
            "shape": 1,
            "future_version": 1,
            "duplicate": 1,
            "type": 1,
        }
        for reason, count in part.rejected.items():
            assert (
                w.metrics.value(
                    "fedfleet_aggregator_updates_rejected_total", shard="0", reason=reason
                )
                == count
            )
        # the worker keeps going after the junk
        more = shard_updates(job, [("late-good", 7, np.ones(n, np.float32) * 0.01, 1)], 0)
        await produce(kafka_bootstrap, unique_prefix, updates=more)
        await w.drain()
        assert js.version == 8


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


async def test_missing_topics_fail_fast_with_a_typed_error(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    from aggregator.errors import ConfigError

    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path), topic_wait_s=1.0)
    worker = AggregatorWorker(settings)
    with pytest.raises(ConfigError):
        await worker.start()
    await worker.stop()  # idempotent after a failed start
