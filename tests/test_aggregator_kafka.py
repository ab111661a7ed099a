"""Integration tests of the shard worker against a real Kafka broker: the golden stream
against the reference, the publish cadence, replays and bad updates, missing topics.
(A kill -9 of one of two worker processes: ``test_aggregator_kafka_crash.py``.)

Set ``FEDFLEET_TEST_KAFKA=host:port`` to reuse a running broker instead of the ``stack``
fixture. Each test uses its own topic prefix, consumer group and checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.worker import AggregatorWorker
from schemas.codec import frame as fr
from schemas.messages import ShardUpdate, StrategyConfig
from tests.reference import rules
from tests.reference.streams import init_slice, make_job, random_stream, ref_stream, shard_updates
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


async def test_missing_topics_fail_fast_with_a_typed_error(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    from aggregator.errors import ConfigError

    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path), topic_wait_s=1.0)
    worker = AggregatorWorker(settings)
    with pytest.raises(ConfigError):
        await worker.start()
    await worker.stop()  # idempotent after a failed start


async def test_a_job_whose_artifact_is_gone_is_set_aside_and_the_rest_go_on(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """An onnx job whose artifact the artifacts topic does not hold: after
    ``artifact_wait_s`` its records are rejected ``artifact_missing`` (counted per shard);
    another job's updates on the same partition are applied meanwhile."""
    import msgspec
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from schemas.messages import ModelSpecMsg, ParamMsg

    good_job = make_job(StrategyConfig(name="fedasync"), shards=1)
    spec = ModelSpecMsg(family="onnx", n_features=2, n_classes=2, artifact="sha256:" + "2" * 64,
                        params=(ParamMsg("w", (2, 2)),), input_shape=(2,))  # fmt: skip
    gone = msgspec.structs.replace(make_job(StrategyConfig(name="fedasync"), shards=1),
                                   spec=spec, shard_bounds=[0, 4])  # fmt: skip
    await create_topics(kafka_bootstrap, unique_prefix, 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{unique_prefix}artifacts", 1, 1)])
    finally:
        await admin.close()
    lost = shard_updates(gone, [("lost-1", 0, np.ones(4, np.float32), 1),
                                ("lost-2", 0, np.ones(4, np.float32), 1)], 0)  # fmt: skip
    good = shard_updates(good_job, random_stream(good_job, 3, seed=2, max_lag=0), 0)
    await produce(kafka_bootstrap, unique_prefix, jobs=[gone, good_job],
                  updates=[lost[0], *good, lost[1]])  # fmt: skip
    settings = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path), artifact_wait_s=1.0)
    async with AggregatorWorker(settings) as w:
        await w.drain()
        assert gone.job_id in w.set_aside and w.job_shard(gone.job_id, 0) is None
        js = w.job_shard(good_job.job_id, 0)
        assert js is not None and js.version == 3
        assert w.partitions[0].rejected == {"artifact_missing": 2}
        assert w.metrics.value("fedfleet_aggregator_updates_rejected_total", shard="0",
                               reason="artifact_missing") == 2  # fmt: skip
        assert w.metrics.value("fedfleet_aggregator_errors_total", kind="artifact_missing") == 1
