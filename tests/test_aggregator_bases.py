"""aggregator.bases: the seen-version floor, the spill/blob tier, and a shard that serves
every acknowledged base across checkpoints and restarts (equal to the reference)."""

from __future__ import annotations

import msgspec
import numpy as np

from aggregator import checkpoint as ck
from aggregator.bases import BaseTier, SeenFloor
from aggregator.checkpoint import MemoryCheckpointStore
from aggregator.shard import PartitionState
from aggregator.strategies import StrategyOptions
from schemas.messages import ShardUpdate, StrategyConfig
from tests.reference import rules
from tests.reference.streams import init_slice, make_job, random_stream, ref_stream, shard_updates


def test_seen_floor_is_the_window_minimum() -> None:
    f = SeenFloor(10.0)
    assert f.lowest() is None
    f.observe(1.0, 5)
    f.observe(2.0, 3)  # a lagging coordinator
    f.observe(3.0, 8)
    assert f.lowest() == 3
    f.observe(12.5, 9)  # 2.0 is now more than 10 s behind
    assert f.lowest() == 8
    f.observe(30.0, -1)  # "knew no version": keeps everything
    assert f.lowest() == 0
    assert SeenFloor(10.0, f.entries()).lowest() == 0


def test_base_tier_plans_writes_and_drops_only_after_a_durable_checkpoint() -> None:
    blobs: dict[str, bytes] = {}
    tier = BaseTier(lambda v: f"h{v}", blobs.get)
    a = {v: np.full(3, float(v), np.float32) for v in range(6)}
    for v in (0, 1, 2):
        tier.evicted(v, a[v])
    new, drop, cold = tier.plan({4: a[4], 5: a[5]}, floor=None, keep=5)
    assert sorted(new) == ["h0", "h1", "h2", "h4", "h5"] and drop == [] and cold == [0, 1, 2]
    tier.failed()  # the write failed: nothing counts as stored
    assert tier.stored == set() and tier.get(1) is not None  # still served from spill
    new, _, _ = tier.plan({4: a[4], 5: a[5]}, floor=None, keep=5)
    blobs.update(new)
    tier.saved()
    assert tier.stored == {0, 1, 2, 4, 5} and tier.spill == {}
    np.testing.assert_array_equal(tier.get(2), a[2])  # from the store now
    new, drop, cold = tier.plan({5: a[5]}, floor=2, keep=5)
    assert new == {} and drop == ["h0", "h1"] and cold == [2, 4]
    tier.saved()
    assert tier.stored == {2, 4, 5}


def _stamped(ups: list[ShardUpdate], seen: list[int]) -> list[ShardUpdate]:
    return [msgspec.structs.replace(u, seen_version=s) for u, s in zip(ups, seen, strict=True)]


def _write_checkpoint(st: PartitionState, store: MemoryCheckpointStore) -> None:
    """What the worker does: blobs, then the checkpoint, then drop obsolete blobs."""
    ckpt, blobs, obsolete = st.checkpoint()
    for k, b in blobs.items():
        store.save(k, b)
    store.save(st.key, ck.dumps(ckpt))
    for k in obsolete:
        store.delete(k)
    st.saved()


def test_shard_serves_old_bases_across_checkpoints_and_restarts() -> None:
    """2 slices in memory, stale bases, checkpoint + restart every 7 records: the shard
    equals the reference that keeps every announced slice (no rejection)."""
    cfg = StrategyConfig(name="fedasync", alpha=0.6, max_staleness=3)
    job = make_job(cfg, publish_every=1)
    stream = random_stream(job, 70, seed=11, max_lag=9, history_size=None)
    ups = shard_updates(job, stream, 0)
    ups = _stamped(ups, [u.base_version for u in ups])  # the coordinator saw the base
    store = MemoryCheckpointStore()
    lookup = {job.job_id: job}.get

    def fresh() -> PartitionState:
        return PartitionState(
            "fl.updates", 0, options=StrategyOptions(history_size=2), load_blob=store.load
        )

    st = fresh()
    restores = 0
    for i, u in enumerate(ups):
        out = st.handle(u, i, lookup)
        assert out.status == "applied", out
        if i % 7 == 6:
            _write_checkpoint(st, store)
            st = fresh()
            st.restore(ck.loads(store.blobs[st.key]), store.load)
            st.activate(job)  # what the worker does on assignment
            restores += 1
    ref = rules.fedasync(
        init_slice(job, 0), ref_stream(ups), alpha=0.6, keep_every=1,
        history_size=None, max_staleness=None,
    )  # fmt: skip
    js = st.jobs[job.job_id]
    assert js.version == ref.version == len(ups) and not ref.rejected
    np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)
    assert restores == 10
    # lags up to 9 > 2 in memory: old bases really came from the store
    assert max(js.version - u.base_version for u in ups[-20:]) > 2


def test_blobs_below_the_floor_are_deleted() -> None:
    cfg = StrategyConfig(name="fedasync", alpha=0.5, max_staleness=2)
    job = make_job(cfg, publish_every=1)
    ups = shard_updates(job, random_stream(job, 30, seed=2, max_lag=0), 0, ts_step=1.0)
    store = MemoryCheckpointStore()
    st = PartitionState(
        "fl.updates", 0, options=StrategyOptions(history_size=2), load_blob=store.load,
        seen_window_s=5.0,
    )  # fmt: skip
    lookup = {job.job_id: job}.get
    for i, u in enumerate(_stamped(ups, [u.base_version for u in ups])):
        st.handle(u, i, lookup)
        _write_checkpoint(st, store)
    kept = sorted(int(k.rsplit(".h", 1)[1]) for k in store.blobs if ".h" in k)
    # records of the last 5 s saw versions >= 24; max_staleness 2 -> 22 and up
    assert kept and min(kept) >= 21 and kept[-1] == 30, kept
