"""Pure partition core: validation, dedupe, publication cadence, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aggregator import checkpoint as ck
from aggregator.shard import PartitionState
from schemas.messages import ShardUpdate, StrategyConfig
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
