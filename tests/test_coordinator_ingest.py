"""Uploads on the ``update`` topic (token, device, shape, duplicates, staleness and NaN
refused before the ack, Kafka failures, Redis round trips), on a real Redis with in-memory
Kafka/MQTT stand-ins. Telemetry, status and leases: ``test_coordinator_ingest_fleet.py``;
sync rounds: ``test_coordinator_ingest_rounds.py``."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest

from coordinator.metrics import counter_value
from coordinator.tasks import deployment_tag
from schemas.codec import frame as fr
from schemas.messages import Pace, ShardUpdate, TaskResponse, Update, UpdateChunk, decode, encode
from tests.test_coordinator_ingest_support import (
    Rig,
    acks,
    add_devices,
    make_job,
    make_sync_job,
    rig,
    tasks_sent,
    update_for,
)
from tests.test_coordinator_support import RoundTrips, frame, redis_url

__all__ = ["redis_url", "rig"]  # fixtures


async def test_selection_upload_ack_duplicate_and_reject(rig: Rig) -> None:
    await add_devices(rig, 3)
    jid = await make_job(rig, concurrency=2)
    bounds = (await rig.state.jobs.get(jid)).spec.shard_bounds
    issued = (await rig.selector.select_once())[jid]
    assert len(issued) == 2 and len(tasks_sent(rig)) == 2
    assert {t.device_id for t in issued} < {"d0", "d1", "d2"}
    waiting = ({"d0", "d1", "d2"} - {t.device_id for t in issued}).pop()
    assert decode(rig.published.on(f"{waiting}/pace")[0], Pace).retry_after_s > 0
    assert (await rig.selector.select_once())[jid] == []  # slots full

    task = issued[0]
    resp = TaskResponse(
        task_id=task.task_id, device_id=task.device_id, status="accepted", ts=time.time()
    )
    await rig.router.handle(f"fleet/{task.device_id}/task_status", encode(resp))
    assert (await rig.state.tasks.get(task.task_id)).state == "accepted"  # type: ignore[union-attr]

    # wrong token -> rejected, nothing produced
    bad = update_for(task, bounds, upload_token="stolen")
    n0 = len(rig.producer.sent)
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(bad))
    assert acks(rig, task.device_id)[-1].status == "rejected"
    assert acks(rig, task.device_id)[-1].reason == "bad_token"
    # another device cannot upload for this task even with the token
    other = issued[1].device_id
    stolen = update_for(task, bounds, device_id=other)
    await rig.router.handle(f"fleet/{other}/update", encode(stolen))
    assert acks(rig, other)[-1].reason == "wrong_device"
    # bounds that do not match the job
    skew = update_for(
        task, bounds, chunks=[UpdateChunk(shard=0, start=0, stop=1, base_version=0, payload=b"x")]
    )
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(skew))
    assert acks(rig, task.device_id)[-1].reason == "shape"
    assert len(rig.producer.sent) == n0

    good = update_for(task, bounds)
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(good))
    assert acks(rig, task.device_id)[-1].status == "accepted"
    shard_recs = [(decode(v, ShardUpdate), k, p) for t, v, k, p in rig.producer.sent[n0:]]
    assert [(su.shard, p, k) for su, k, p in shard_recs] == [
        (0, 0, good.update_id.encode()), (1, 1, good.update_id.encode())]  # fmt: skip
    assert (await rig.state.tasks.get(task.task_id)).state == "uploaded"  # type: ignore[union-attr]
    dev = await rig.state.fleet.get(task.device_id)
    assert dev is not None and dev["contributions"] == 1 and dev["current_task"] is None

    # resend from the outbox -> duplicate, not produced again; another update id -> rejected
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(good))
    assert acks(rig, task.device_id)[-1].status == "duplicate"
    again = update_for(task, bounds, update_id="u-other")
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(again))
    assert acks(rig, task.device_id)[-1].reason == "token_used"
    assert len(rig.producer.sent) == n0 + 2

    unknown = update_for(task, bounds, task_id="t-unknown")
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(unknown))
    assert acks(rig, task.device_id)[-1].reason == "unknown_task"
    # a task of another deployment on the same broker (another topic prefix): left for its
    # own coordinator to answer, never refused here (the device would drop it)
    ours = deployment_tag(rig.state.settings.topic_prefix)
    other = "000000" if ours != "000000" else "111111"
    n_acks = len(acks(rig, task.device_id))
    foreign = update_for(task, bounds, task_id=f"t-{other}-0123456789abcdef")
    await rig.router.handle(f"fleet/{task.device_id}/update", encode(foreign))
    assert len(acks(rig, task.device_id)) == n_acks
    assert counter_value(rig.state.metrics.rejected, source="update", reason="foreign_task") == 1
    assert task.task_id.startswith(f"t-{ours}-")  # this deployment's ids carry its tag
    stats = await rig.state.stats.stats(jid)
    assert stats["updates_accepted"] == 1 and stats["tasks_issued"] == 2

    # the freed slot is refilled (by the waiting device: fewest contributions)
    refill = (await rig.selector.select_once())[jid]
    assert [t.device_id for t in refill] == [waiting]


async def test_kafka_failure_means_no_ack_and_retry_succeeds(rig: Rig) -> None:
    await add_devices(rig, 1)
    jid = await make_job(rig, concurrency=1)
    (task,) = (await rig.selector.select_once())[jid]
    bounds = (await rig.state.jobs.get(jid)).spec.shard_bounds
    upd = update_for(task, bounds)
    rig.producer.fail = True
    with pytest.raises(RuntimeError):
        await rig.uploads.handle(upd, task.device_id)
    assert acks(rig, task.device_id) == []
    assert (await rig.state.tasks.get(task.task_id)).state == "uploading"  # type: ignore[union-attr]
    assert await rig.state.tasks.active_count(jid) == 1  # still holds its slot
    # past the deadline the slot is freed, the claimed upload stays acceptable; a task
    # that cannot be produced (Kafka still down) is rolled back, not left leased
    out = await rig.selector.select_once(time.time() + rig.state.settings.lease_s + 1)
    assert out[jid] == [] and await rig.state.tasks.active_count(jid) == 0
    assert (await rig.state.fleet.history(task.device_id))[0]["outcome"] == "upload_incomplete"
    rig.producer.fail = False
    assert await rig.uploads.handle(upd, task.device_id) == "accepted"
    assert acks(rig, task.device_id)[-1].status == "accepted"


async def test_an_accepted_upload_costs_at_most_three_redis_round_trips(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Happy path, async and sync jobs (job spec cached, scripts loaded by a first upload):
    read the task, claim it, confirm it (task uploaded + device released + stats)."""
    await add_devices(rig, 6)
    jid = await make_job(rig, concurrency=3)
    sjid, sbounds = await make_sync_job(rig)
    issued = await rig.selector.select_once()
    t1, t2, t3 = issued[jid]
    s1, s2, _ = issued[sjid]
    bounds = (await rig.state.jobs.get(jid)).spec.shard_bounds
    assert await rig.uploads.handle(update_for(t1, bounds), t1.device_id) == "accepted"
    assert await rig.uploads.handle(update_for(s1, sbounds), s1.device_id) == "accepted"
    trips = RoundTrips(monkeypatch)
    assert await rig.uploads.handle(update_for(t2, bounds), t2.device_id) == "accepted"
    assert trips.take() <= 3
    assert await rig.uploads.handle(update_for(s2, sbounds), s2.device_id) == "accepted"
    assert trips.take() <= 3
    # and the confirm did all of the bookkeeping
    dev = await rig.state.fleet.get(t2.device_id)
    assert dev is not None and dev["current_task"] is None and dev["contributions"] == 1
    assert "last_contribution_ts" in dev and dev["history"][0]["outcome"] == "uploaded"
    assert dev["tasks_today"] == 1 and dev["cooldown_until"] is None  # kept as they were
    # the contrib order moved like FleetStore.release_task's: t2's device is now behind
    # every device that never contributed
    fresh, _ = await rig.state.fleet.candidates(10, lambda d: d.contributions == 0)
    assert t2.device_id not in {d.device_id for d in fresh} and len(fresh) == 2
    assert (await rig.state.tasks.get(t2.task_id)).state == "uploaded"  # type: ignore[union-attr]
    assert await rig.state.tasks.leased(jid) == [t3.task_id]
    assert (await rig.state.stats.stats(jid))["updates_accepted"] == 2
    assert (await rig.state.stats.stats(sjid))["updates_accepted"] == 2


async def test_stale_or_bad_uploads_are_refused_before_the_ack(rig: Rig) -> None:
    """Whatever a shard could refuse is decided once, before the ack: a base more than
    max_staleness behind the newest version of *any* shard, a frame with NaN; the task is
    aborted with the reason, nothing reaches Kafka. Admitted records carry seen_version."""
    await add_devices(rig, 3)
    jid = await make_job(rig, concurrency=3)
    spec = (await rig.state.jobs.get(jid)).spec
    bounds = list(spec.shard_bounds)
    issued = (await rig.selector.select_once())[jid]
    n0 = len(rig.producer.sent)
    bound = spec.strategy.max_staleness
    rig.newest[jid] = [3, bound + 1]  # shard 1 moved on; every base below is 0
    stale = update_for(issued[0], bounds)
    await rig.router.handle(f"fleet/{stale.device_id}/update", encode(stale))
    ack = acks(rig, stale.device_id)[-1]
    assert (ack.status, ack.reason) == ("rejected", "too_stale")
    rec = await rig.state.tasks.get(stale.task_id)
    assert rec is not None and rec.state == "aborted"
    reason = await rig.redis.hget(rig.keys.task(stale.task_id), "reason")
    assert "too_stale" in reason and "shard 1" in reason
    assert (await rig.state.fleet.get(stale.device_id))["current_task"] in ("", None)  # type: ignore[index]

    nan = np.zeros(bounds[1], np.float32)
    nan[0] = np.nan
    raw = fr.pack(quant=0, flags=0, nlow=0, length=bounds[1], k=bounds[1], scale=1.0,
                  planes=fr.byte_planes(nan), level=1)  # fmt: skip
    bad = update_for(issued[1], bounds)
    bad = msgspec.structs.replace(
        bad, chunks=[msgspec.structs.replace(bad.chunks[0], payload=raw), *bad.chunks[1:]]
    )
    rig.newest[jid] = [0, 0]
    await rig.router.handle(f"fleet/{bad.device_id}/update", encode(bad))
    assert acks(rig, bad.device_id)[-1].reason == "non_finite"
    assert len(rig.producer.sent) == n0  # neither reached Kafka

    rig.newest[jid] = [2, bound]  # exactly max_staleness behind: admitted
    good = update_for(issued[2], bounds)
    await rig.router.handle(f"fleet/{good.device_id}/update", encode(good))
    assert acks(rig, good.device_id)[-1].status == "accepted"
    recs = [decode(v, ShardUpdate) for _, v, _, _ in rig.producer.sent[n0:]]
    assert sorted((r.shard, r.seen_version) for r in recs) == [(0, 2), (1, bound)]
    stats = await rig.state.stats.stats(jid)
    assert stats["updates_too_stale"] == 1 and stats["updates_non_finite"] == 1
    assert stats["updates_rejected"] == 2 and stats["updates_accepted"] == 1


def test_check_bases_and_payloads_are_pure() -> None:
    from coordinator.errors import UploadRejected
    from coordinator.uploads import check_bases, check_payloads

    chunks = [UpdateChunk(shard=s, start=2 * s, stop=2 * s + 2, base_version=5,
                          payload=frame(2, s)) for s in range(2)]  # fmt: skip
    upd = Update(update_id="u", task_id="t", job_id="j", device_id="d", upload_token="x",
                 num_samples=1, chunks=chunks, sent_ts=time.time())  # fmt: skip
    check_bases(upd, [9, 5], 4)
    check_bases(upd, [0, 1], 4)  # bases ahead of this coordinator's view pass
    with pytest.raises(UploadRejected) as e:
        check_bases(upd, [5, 10], 4)
    assert e.value.code == "too_stale" and "shard 1" in str(e.value)
    check_payloads(upd)
    short = msgspec.structs.replace(chunks[0], stop=3)
    with pytest.raises(UploadRejected) as e:
        check_payloads(msgspec.structs.replace(upd, chunks=[short, chunks[1]]))
    assert e.value.code in ("shape", "codec")
