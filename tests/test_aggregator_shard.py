"""Pure partition core: validation, dedupe, publication cadence, checkpoint round trip."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from aggregator import checkpoint as ck
from aggregator.metrics import AggregatorMetrics
from aggregator.settings import AggregatorSettings
from aggregator.shard import PartitionState
from aggregator.worker import AggregatorWorker
from coordinator.metrics import counter_value
from schemas.messages import ShardUpdate, ShardVersion, StrategyConfig, decode
from tests.reference.streams import make_job, random_stream, shard_updates


def test_rejections_and_publication_cadence() -> None:
    job = make_job(StrategyConfig(name="fedasync_delta"), publish_every=2)
    ups = shard_updates(job, random_stream(job, 5, max_lag=0), 0)
    st = PartitionState("t", 0)
    outs = [st.handle(u, i, {job.job_id: job}.get) for i, u in enumerate(ups)]
    assert [o.status for o in outs] == ["applied"] * 5
    assert [pv.version for pv in st.outbox] == [0, 2, 4]
    assert st.outbox[1].build().version == 2
    wrong = ShardUpdate(
        **{
            **{f: getattr(ups[0], f) for f in ups[0].__struct_fields__},
            "update_id": "x",
            "shard": 1,
        }
    )
    assert st.handle(wrong, 5, {job.job_id: job}.get).reason == "shard_mismatch"
    assert st.handle(b"junk", 6, {job.job_id: job}.get).status == "rejected"
    assert st.handle(ups[1], 7, lambda _: None).reason == "unknown_job"
    assert st.handle(ups[1], 8, {job.job_id: job}.get).reason == "duplicate"
    assert st.next_offset == 9


def test_checkpoint_roundtrip_resumes_identically(tmp_path: object) -> None:
    job = make_job(StrategyConfig(name="fedasync"), publish_every=2)
    ups = shard_updates(job, random_stream(job, 20, seed=3, max_lag=3), 1)
    lookup = {job.job_id: job}.get
    a = PartitionState("t", 1)
    for i, u in enumerate(ups[:11]):
        a.handle(u, i, lookup)
    store = ck.FileCheckpointStore(str(tmp_path))
    ckpt, blobs, obsolete = a.checkpoint()
    assert len(blobs) == len(ckpt.jobs[0].history) > 1 and not obsolete
    for k, v in blobs.items():
        store.save(k, v)
    store.save(a.key, ck.dumps(ckpt))
    a.saved()  # the checkpoint is durable: its blobs count as stored
    b = PartitionState("t", 1)
    blob = store.load(a.key)
    assert blob is not None
    b.restore(ck.loads(blob), store.load)
    assert b.next_offset == 11
    for i, u in enumerate(ups[11:], start=11):
        a.handle(u, i, lookup)
        b.handle(u, i, lookup)
    np.testing.assert_array_equal(a.jobs[job.job_id].params, b.jobs[job.job_id].params)
    _, blobs2, _ = a.checkpoint()  # only versions published since the last checkpoint
    assert 0 < len(blobs2) < len(blobs) + 5
    assert b.handle(ups[0], 99, lookup).status == "duplicate"  # window survived


def test_corrupt_checkpoint_is_a_typed_error() -> None:
    import pytest

    from aggregator.errors import CheckpointError

    with pytest.raises(CheckpointError):
        ck.loads(b"\x93garbage")


def test_settings_from_env() -> None:
    from aggregator.settings import AggregatorSettings

    s = AggregatorSettings.from_env(
        {
            "FEDFLEET_AGG_KAFKA_BOOTSTRAP": "h:1",
            "FEDFLEET_AGG_PUBLISH_EVERY": "3",
            "FEDFLEET_AGG_CHECKPOINT_INTERVAL_S": "0.5",
        },
        topic_prefix="x.",
    )
    assert (s.kafka_bootstrap, s.publish_every, s.checkpoint_interval_s) == ("h:1", 3, 0.5)
    assert (s.jobs_topic, s.updates_topic, s.models_topic) == ("x.jobs", "x.updates", "x.models")
    assert s.min_publish_interval_s == 0.2  # default
    t = AggregatorSettings.from_env({"FEDFLEET_AGG_MIN_PUBLISH_INTERVAL_S": "0"})
    assert t.min_publish_interval_s == 0.0
    import pytest

    from aggregator.errors import ConfigError

    with pytest.raises(ConfigError):
        AggregatorSettings(min_publish_interval_s=-1.0)


class CheckpointStoreContract:
    """Every CheckpointStore (filesystem and in-memory) honours the same contract."""

    def make(self, tmp_path: Path) -> ck.CheckpointStore:
        raise NotImplementedError

    def test_save_load_overwrite_delete(self, tmp_path: Path) -> None:
        store = self.make(tmp_path)
        assert store.load("fl.updates-0") is None
        store.save("fl.updates-0", b"one")
        store.save("fl.updates-0", b"two")
        assert store.load("fl.updates-0") == b"two"
        store.save("fl.updates-0.job:1.h5", b"hist")
        assert store.load("fl.updates-0.job:1.h5") == b"hist"
        store.delete("fl.updates-0.job:1.h5")
        store.delete("never-written")
        assert store.load("fl.updates-0.job:1.h5") is None
        assert store.load("fl.updates-0") == b"two"


class TestFileStore(CheckpointStoreContract):
    def make(self, tmp_path: Path) -> ck.CheckpointStore:
        return ck.FileCheckpointStore(tmp_path / "ck")

    def test_no_temp_files_left(self, tmp_path: Path) -> None:
        store = ck.FileCheckpointStore(tmp_path)
        store.save("k", b"x" * 1000)
        assert [p.name for p in tmp_path.iterdir()] == ["k.ckpt"]


class TestMemoryStore(CheckpointStoreContract):
    def make(self, tmp_path: Path) -> ck.CheckpointStore:
        return ck.MemoryCheckpointStore()


# ------------------------------------------------ time-bounded cadence and crashes


def _save(store: ck.CheckpointStore, st: PartitionState) -> None:
    ckpt, blobs, obsolete = st.checkpoint()
    for k, v in blobs.items():
        store.save(k, v)
    store.save(st.key, ck.dumps(ckpt))
    for k in obsolete:
        store.delete(k)


def _load(store: ck.CheckpointStore, key: str, **kw: object) -> PartitionState:
    st = PartitionState("t", 0, **kw)  # type: ignore[arg-type]
    blob = store.load(key)
    assert blob is not None
    st.restore(ck.loads(blob), store.load)
    return st


def test_replay_after_a_crash_rederives_the_same_announcements() -> None:
    """Regular announcements depend on the records only: a new owner replaying from the
    last checkpoint announces the very versions (and slices) the crashed one did."""
    job = make_job(StrategyConfig(name="fedasync", max_staleness=10), shards=1, publish_every=2)
    kw: dict[str, Any] = {"ts_step": 0.06, "min_interval": 0.2}
    ups = shard_updates(job, random_stream(job, 60, seed=4, max_lag=6, **kw), 0, ts_step=0.06)
    lookup = {job.job_id: job}.get
    a = PartitionState("t", 0, min_publish_interval_s=0.2)
    store = ck.MemoryCheckpointStore()
    for i, u in enumerate(ups[:25]):
        a.handle(u, i, lookup)
    _save(store, a)
    a.outbox.clear()
    for i, u in enumerate(ups[25:], start=25):  # announced, never checkpointed: then kill -9
        a.handle(u, i, lookup)
    b = _load(store, a.key, min_publish_interval_s=0.2)
    for i, u in enumerate(ups[25:], start=25):
        b.handle(u, i, lookup)
    assert [pv.version for pv in b.outbox] == [pv.version for pv in a.outbox]
    assert len(a.outbox) >= 3
    assert [pv.raw for pv in b.outbox] == [pv.raw for pv in a.outbox]
    ja, jb = a.jobs[job.job_id], b.jobs[job.job_id]
    assert ja.strategy.unwrap().history.versions() == jb.strategy.unwrap().history.versions()  # type: ignore[attr-defined]
    np.testing.assert_array_equal(ja.params, jb.params)
    assert a.rejected == b.rejected


def test_idle_announcement_is_held_until_a_checkpoint_records_it() -> None:
    job = make_job(StrategyConfig(name="fedasync", max_staleness=20), shards=1, publish_every=1)
    # stream time never reaches the interval
    kw: dict[str, Any] = {"ts_step": 0.01, "min_interval": 10.0}
    ups = shard_updates(job, random_stream(job, 12, seed=5, max_lag=0, **kw), 0, ts_step=0.01)
    lookup = {job.job_id: job}.get
    a = PartitionState("t", 0, min_publish_interval_s=10.0)
    for i, u in enumerate(ups[:8]):
        a.handle(u, i, lookup)
    js = a.jobs[job.job_id]
    # version 0 at creation (no stream time yet), so the first version is due at once
    assert [pv.version for pv in a.outbox] == [0, 1] and js.version == 8 and a.unannounced
    a.outbox.clear()
    assert a.announce_latest() == 1 and a.announce_latest() == 0
    assert a.outbox == [] and [pv.version for pv in a.held] == [8]  # not producible yet
    store = ck.MemoryCheckpointStore()
    _save(store, a)
    a.release_held()  # the worker does this once the checkpoint is written
    assert [pv.version for pv in a.outbox] == [8] and not a.unannounced
    # the checkpoint knows version 8 was announced and keeps it as a base
    b = _load(store, a.key, min_publish_interval_s=10.0)
    delta = np.full(job.shard_bounds[1], 0.1, np.float32)
    late = shard_updates(job, [("late", 8, delta, 1)], 0, ts_step=0.01)
    for st in (a, b):
        for i, u in enumerate(ups[8:], start=8):
            st.handle(u, i, lookup)
        assert st.handle(late[0], 12, lookup).status == "applied"  # base 8, staleness 4
        assert st.jobs[job.job_id].last_published == 8
    np.testing.assert_array_equal(a.jobs[job.job_id].params, b.jobs[job.job_id].params)
    # the idle announcement does not shift the regular (record-driven) schedule
    c = PartitionState("t", 0, min_publish_interval_s=10.0)
    for i, u in enumerate(ups):
        c.handle(u, i, lookup)
    assert c.jobs[job.job_id].cadence == a.jobs[job.job_id].cadence


def test_interval_zero_is_the_plain_publish_every_cadence() -> None:
    job = make_job(StrategyConfig(name="fedbuff", buffer_size=2), shards=1, publish_every=3)
    ups = shard_updates(job, random_stream(job, 30, seed=6, max_lag=0), 0)
    st = PartitionState("t", 0, min_publish_interval_s=0.0)
    for i, u in enumerate(ups):
        st.handle(u, i, {job.job_id: job}.get)
    assert [pv.version for pv in st.outbox] == [0, 3, 6, 9, 12, 15]


def test_old_checkpoint_without_cadence_fields_resumes_on_publish_every() -> None:
    job = make_job(StrategyConfig(name="fedasync_delta"), shards=1, publish_every=2)
    ups = shard_updates(job, random_stream(job, 9, seed=7, max_lag=0), 0)
    lookup = {job.job_id: job}.get
    a = PartitionState("t", 0)
    for i, u in enumerate(ups[:5]):
        a.handle(u, i, lookup)
    ckpt, _, _ = a.checkpoint()
    import msgspec

    raw = msgspec.msgpack.decode(ck.dumps(ckpt))
    for j in raw["jobs"]:
        for k in ("cadence_version", "cadence_ts", "clock"):
            del j[k]
    b = PartitionState("t", 0)
    b.restore(ck.loads(msgspec.msgpack.encode(raw)), lambda _: None)
    for i, u in enumerate(ups[5:], start=5):
        b.handle(u, i, lookup)
    assert [pv.version for pv in b.outbox] == [6, 8]


def test_the_workers_batch_path_gives_the_same_outcomes_as_raw_records(tmp_path: Path) -> None:
    """``AggregatorWorker._apply_records`` (message decoded first, payload decoded by the
    partition after its checks, no task switch per record) matches ``handle`` on raw
    bytes: outcomes, slice, rejections, metrics; records below ``next_offset`` skipped."""
    import asyncio

    from aggregator.checkpoint import FileCheckpointStore
    from aggregator.settings import AggregatorSettings
    from aggregator.worker import AggregatorWorker
    from schemas.messages import encode

    job = make_job(StrategyConfig(name="fedasync", max_staleness=3), shards=2)
    ups = shard_updates(job, random_stream(job, 12, seed=8, max_lag=5, dup_every=4), 0)
    fields = {f: getattr(ups[0], f) for f in ups[0].__struct_fields__}
    bad = [
        ShardUpdate(**{**fields, "update_id": "b1", "payload": b"FFUC" + b"\0" * 30}),
        ShardUpdate(**{**fields, "update_id": "b2", "shard": 1}),
        ShardUpdate(**{**fields, "update_id": "b3", "job_id": "nope", "payload": b"x"}),
    ]
    raws = [encode(u) for u in [*ups, *bad]] + [b"junk"]
    a = PartitionState("t", 0)
    outs_a = [a.handle(r, i, {job.job_id: job}.get) for i, r in enumerate(raws)]

    class Rec:
        def __init__(self, offset: int, value: bytes) -> None:
            self.offset, self.value = offset, value

    w = AggregatorWorker(AggregatorSettings(), store=FileCheckpointStore(str(tmp_path)))
    w.jobs[job.job_id] = job
    b = w.partitions[0] = PartitionState("t", 0)
    recs = [Rec(i, r) for i, r in enumerate(raws)]
    outs_b = []
    orig = w._apply

    def spy(*args: Any) -> Any:
        outs_b.append(orig(*args))
        return outs_b[-1]

    caught_up: list[int] = []

    async def catch_up() -> None:  # no Kafka here: the unknown job stays unknown
        caught_up.append(1)

    w._apply = spy  # type: ignore[method-assign,assignment]
    w.catch_up_jobs = catch_up  # type: ignore[method-assign]
    assert asyncio.run(w._apply_records(b, recs[:5])) == 5
    assert asyncio.run(w._apply_records(b, recs[3:])) == len(recs) - 5  # 3, 4 seen
    assert outs_a == outs_b
    assert caught_up == [1]  # the record naming an unknown job looked for it first
    np.testing.assert_array_equal(a.jobs[job.job_id].params, b.jobs[job.job_id].params)
    assert a.rejected == b.rejected
    applied = sum(o.status in ("applied", "buffered") for o in outs_a)
    m = w.metrics
    labels = {"shard": "0", "strategy": "fedasync"}
    assert m.value("fedfleet_aggregator_updates_applied_total", **labels) == applied
    assert m.value("fedfleet_aggregator_apply_seconds_count") == len(raws)
    for reason, n in a.rejected.items():
        got = m.value("fedfleet_aggregator_updates_rejected_total", shard="0", reason=reason)
        assert got == n


def test_stopped_job_still_applies_updates_the_coordinator_accepted() -> None:
    """Stopping a job stops new tasks; an acknowledged upload is still applied once."""
    import msgspec

    job = make_job(StrategyConfig(name="fedasync"), publish_every=1)
    stopped = msgspec.structs.replace(job, status="stopped")
    ups = shard_updates(job, random_stream(job, 3, max_lag=0), 0)
    st = PartitionState("t", 0)
    assert st.handle(ups[0], 0, {job.job_id: job}.get).status == "applied"
    outs = [st.handle(u, i, {job.job_id: stopped}.get) for i, u in enumerate(ups[1:], 1)]
    assert [o.status for o in outs] == ["applied", "applied"]
    assert st.handle(ups[2], 3, {job.job_id: stopped}.get).reason == "duplicate"


class _FlakyProducer:
    """While ``down`` (a leader cut off), Kafka refuses every send; then takes them."""

    def __init__(self) -> None:
        self.down = True
        self.sent: list[bytes] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.down:
            fut.set_exception(KafkaTimeoutError("leader cut off"))
        else:
            self.sent.append(value)
            fut.set_result(None)
        return fut


async def test_announcements_kafka_refused_are_kept_in_order_and_sent_again(
    tmp_path: Path,
) -> None:
    """A publish that times out does not end the worker: the versions not acknowledged
    stay queued, ahead of newer ones, and go out on the next round."""
    worker = AggregatorWorker(AggregatorSettings(checkpoint_dir=str(tmp_path)),
                              metrics=AggregatorMetrics(CollectorRegistry()))  # fmt: skip
    producer = _FlakyProducer()
    worker._producer = producer
    loop = asyncio.get_running_loop()

    def built(version: int) -> asyncio.Future[ShardVersion]:
        f: asyncio.Future[ShardVersion] = loop.create_future()
        f.set_result(ShardVersion(job_id="j", model_name="m", shard=0, start=0, stop=1,
                                  version=version, params=b"", updates_applied=version,
                                  ts=1.0))  # fmt: skip
        return f

    worker._builds = [built(1), built(2)]
    await worker._publish_outboxes()  # refused: nothing acknowledged, nothing lost
    assert producer.sent == [] and len(worker._builds) == 2
    assert counter_value(worker.metrics.errors, kind="publish") == 1
    worker._builds.append(built(3))
    producer.down = False
    await worker._publish_outboxes()
    versions = [decode(v, ShardVersion).version for v in producer.sent]
    assert versions == [1, 2, 3] and worker._builds == []


async def test_a_job_read_that_times_out_is_retried_not_taken_as_an_unknown_job(
    tmp_path: Path,
) -> None:
    worker = AggregatorWorker(AggregatorSettings(checkpoint_dir=str(tmp_path)),
                              metrics=AggregatorMetrics(CollectorRegistry()))  # fmt: skip
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise KafkaTimeoutError("jobs topic leader cut off")

    worker.catch_up_jobs = flaky  # type: ignore[method-assign]
    await worker._catch_up_jobs_until_read(max_delay_s=0.01)
    assert calls == 3
    assert counter_value(worker.metrics.errors, kind="jobs") == 2
