"""Ingest, leases, selection and uploads on a real Redis with in-memory Kafka/MQTT stand-ins."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from redis.asyncio import Redis

from coordinator.api import AppState
from coordinator.ingest import Router, TelemetryBatcher
from coordinator.jobs import build_job
from coordinator.keys import Keys
from coordinator.metrics import counter_value
from coordinator.selector import Selector
from coordinator.uploads import UploadHandler
from schemas.codec import frame as fr
from schemas.messages import (
    DeviceStatus,
    JobSpec,
    Pace,
    ShardUpdate,
    Task,
    TaskResponse,
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
    RoundTrips,
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
    redis: Any = Redis.from_url(redis_url, decode_responses=True)
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


async def test_telemetry_status_and_bad_input(rig: Rig) -> None:
    m = rig.state.metrics
    before = counter_value(m.rejected, source="telemetry", reason="device_mismatch")
    await add_devices(rig, 3)
    assert len(await rig.state.fleet.live_ids()) == 3
    await rig.router.handle("fleet/d9/telemetry", tel("d0"))  # topic/payload mismatch
    await rig.router.handle("fleet/d0/telemetry", b"\x93garbage")
    await rig.router.handle("fleet/d0/telemetry", tel("d0", battery=150.0))
    await rig.router.handle("fleet/d0/nonsense", b"")
    assert counter_value(m.rejected, source="telemetry", reason="device_mismatch") == before + 1
    assert counter_value(m.rejected, source="telemetry", reason="range") >= 1
    # LWT: offline at once, and a buffered telemetry of that device is dropped
    await rig.router.handle("fleet/d1/telemetry", tel("d1"))
    off = DeviceStatus(device_id="d1", state="offline", ts=time.time())
    await rig.router.handle("fleet/d1/status", encode(off))
    await rig.router.batcher.flush()
    assert (await rig.state.fleet.get("d1"))["state"] == "offline"  # type: ignore[index]
    assert sorted(await rig.state.fleet.live_ids()) == ["d0", "d2"]


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
    stats = await rig.state.stats.stats(jid)
    assert stats["updates_accepted"] == 1 and stats["tasks_issued"] == 2

    # the freed slot is refilled (by the waiting device: fewest contributions)
    refill = (await rig.selector.select_once())[jid]
    assert [t.device_id for t in refill] == [waiting]


async def test_expired_lease_is_reissued_to_another_device(rig: Rig) -> None:
    await add_devices(rig, 2)
    jid = await make_job(rig, concurrency=1)
    now = time.time()
    (t1,) = (await rig.selector.select_once(now))[jid]
    later = now + rig.state.settings.lease_s + 1
    # keep both devices fresh in Redis at the later time
    await rig.state.fleet.write_telemetry(
        [decode(tel(d), Telemetry) for d in ("d0", "d1")], now=later
    )
    (t2,) = (await rig.selector.select_once(later))[jid]
    assert t2.device_id != t1.device_id and t2.task_id != t1.task_id
    rec1 = await rig.state.tasks.get(t1.task_id)
    rec2 = await rig.state.tasks.get(t2.task_id)
    assert rec1 is not None and rec1.state == "expired"
    assert rec2 is not None and rec2.reissue_of == t1.task_id
    assert (await rig.state.stats.stats(jid))["tasks_expired"] == 1
    # a late update for the expired task is still taken (once); staleness is the
    # aggregator's business
    bounds = (await rig.state.jobs.get(jid)).spec.shard_bounds
    await rig.router.handle(f"fleet/{t1.device_id}/update", encode(update_for(t1, bounds)))
    assert acks(rig, t1.device_id)[-1].status == "accepted"
    assert (await rig.state.stats.stats(jid))["late_updates"] == 1


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


async def test_declined_and_aborted_free_the_slot(rig: Rig) -> None:
    await add_devices(rig, 2)
    jid = await make_job(rig, concurrency=1)
    (task,) = (await rig.selector.select_once())[jid]
    resp = TaskResponse(
        task_id=task.task_id,
        device_id=task.device_id,
        status="declined",
        reason="battery",
        ts=time.time(),
    )
    await rig.router.handle(f"fleet/{task.device_id}/task_status", encode(resp))
    assert await rig.state.tasks.active_count(jid) == 0
    (t2,) = (await rig.selector.select_once())[jid]
    abort = TaskResponse(
        task_id=t2.task_id, device_id=t2.device_id, status="aborted", ts=time.time()
    )
    await rig.router.handle(f"fleet/{t2.device_id}/task_status", encode(abort))
    assert (await rig.state.tasks.get(t2.task_id)).state == "aborted"  # type: ignore[union-attr]
    bounds = (await rig.state.jobs.get(jid)).spec.shard_bounds
    await rig.router.handle(f"fleet/{t2.device_id}/update", encode(update_for(t2, bounds)))
    assert acks(rig, t2.device_id)[-1].reason == "task_aborted"


async def make_sync_job(rig: Rig) -> tuple[str, list[int]]:
    """A sync job: rounds of 2, over-selection 1.5 (3 invited), 50 s deadline."""
    sel = {"mode": "sync", "over_selection": 1.5, "round_deadline_s": 50.0}
    jid = await make_job(rig, concurrency=2, selection=sel)
    return jid, (await rig.state.jobs.get(jid)).spec.shard_bounds


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


async def test_sync_rounds_over_select_and_close(rig: Rig) -> None:
    await add_devices(rig, 6)
    jid, bounds = await make_sync_job(rig)
    now = time.time()
    r1 = (await rig.selector.select_once(now))[jid]
    assert len(r1) == 3  # 2 * 1.5 invited
    assert all(t.deadline_ts == pytest.approx(now + 50.0) for t in r1)
    assert (await rig.selector.select_once(now))[jid] == []  # round still open
    for t in r1[:2]:
        await rig.router.handle(f"fleet/{t.device_id}/update", encode(update_for(t, bounds)))
    r2 = (await rig.selector.select_once(now))[jid]  # target reached: next round
    assert len(r2) == 3
    left = await rig.state.tasks.get(r1[2].task_id)
    assert left is not None and left.state == "expired"
    assert (await rig.state.stats.stats(jid))["tasks_round_closed"] == 1
    # the deadline closes a round that did not reach its target
    r3 = (await rig.selector.select_once(now + 51.0))[jid]
    assert len(r3) == 3 and {t.task_id for t in r3}.isdisjoint({t.task_id for t in r2})
    hist = await rig.state.fleet.history(r1[0].device_id)
    assert hist[0]["outcome"] == "uploaded" and hist[0]["task_id"] == r1[0].task_id


async def test_sync_round_slot_held_by_a_claim_kafka_did_not_confirm(rig: Rig) -> None:
    """A claimed upload that Kafka failed keeps its round slot: the round is full after one
    more, a third is refused, and the device's re-send of the first is still accepted."""
    await add_devices(rig, 3)
    jid, bounds = await make_sync_job(rig)
    t1, t2, t3 = (await rig.selector.select_once())[jid]
    rig.producer.fail = True
    with pytest.raises(RuntimeError):
        await rig.uploads.handle(update_for(t1, bounds), t1.device_id)
    rig.producer.fail = False
    assert await rig.uploads.handle(update_for(t2, bounds), t2.device_id) == "accepted"
    assert await rig.uploads.handle(update_for(t3, bounds), t3.device_id) == "rejected"
    assert acks(rig, t3.device_id)[-1].reason == "round_closed"
    assert await rig.uploads.handle(update_for(t1, bounds), t1.device_id) == "accepted"
    key = rig.keys.round(jid)
    assert (await rig.redis.hget(key, "taken")) == "2"
    states = [(await rig.state.tasks.get(t.task_id)).state for t in (t1, t2, t3)]  # type: ignore[union-attr]
    assert states == ["uploaded", "uploaded", "expired"]


async def test_sync_round_closed_at_deadline_refuses_late_uploads(rig: Rig) -> None:
    """A round closed by its deadline takes no more uploads (the count read at close is
    the aggregator's), and they never count in the next round."""
    await add_devices(rig, 6)
    jid, bounds = await make_sync_job(rig)
    now = time.time()
    r1 = (await rig.selector.select_once(now))[jid]
    assert await rig.uploads.handle(update_for(r1[0], bounds), r1[0].device_id) == "accepted"
    await add_devices(rig, 6)  # still online at the later clock
    r2 = (await rig.selector.select_once(now + 51.0))[jid]  # deadline: close, open round 2
    assert len(r2) == 3
    late = r1[1]
    assert await rig.uploads.handle(update_for(late, bounds), late.device_id) == "rejected"
    assert acks(rig, late.device_id)[-1].reason == "round_closed"
    rnd = await rig.redis.hgetall(rig.keys.round(jid))
    assert (rnd["round"], rnd["taken"]) == ("2", "0")
    assert await rig.uploads.handle(update_for(r2[0], bounds), r2[0].device_id) == "accepted"
    assert (await rig.redis.hget(rig.keys.round(jid), "taken")) == "1"


async def test_dispatcher_pushes_tasks_and_skips_stale_or_bad() -> None:
    from coordinator.dispatcher import dispatch_record
    from tests.test_coordinator_support import metrics

    pub = Published()
    now = time.time()
    task = Task(task_id="t1", job_id="j", device_id="d7", model_name="m", upload_token="x",
                issued_ts=now, deadline_ts=now + 10)  # fmt: skip
    assert await dispatch_record(encode(task), pub, metrics(), now)
    assert pub.items == [("fleet/d7/task", encode(task), 1)]
    assert not await dispatch_record(encode(task), pub, metrics(), now + 11)
    assert not await dispatch_record(b"\xc1", pub, metrics(), now)
    assert len(pub.items) == 1


async def test_selection_lock_lets_one_process_select(rig: Rig) -> None:
    await add_devices(rig, 3)
    jid = await make_job(rig, concurrency=2)
    key = rig.keys.selector_lock
    await rig.redis.set(key, "other-process", px=60_000)
    assert await rig.selector.locked_pass() is None  # another coordinator is selecting
    await rig.redis.delete(key)
    out = await rig.selector.locked_pass()
    assert out is not None and len(out[jid]) == 2
    assert await rig.redis.get(key) is None  # released after the pass


async def test_telemetry_in_flight_does_not_revive_a_device_that_said_offline(rig: Rig) -> None:
    """Telemetry flushed just after a device's ``offline`` status (it was in flight in MQTT
    or the ingest batch) must not make the departed device selectable again; telemetry
    after the grace period does (and an ``online`` status always does)."""
    from coordinator.fleet import OFFLINE_GRACE_S

    fleet = rig.state.fleet
    await add_devices(rig, 2)
    now = time.time()
    assert sorted(await fleet.live_ids(now)) == ["d0", "d1"]
    await fleet.write_status(DeviceStatus(device_id="d0", state="offline", ts=now), now=now)
    late = [decode(tel(d), Telemetry) for d in ("d0", "d1")]
    await fleet.write_telemetry(late, now=now + 0.05)
    assert await fleet.live_ids(now + 0.05) == ["d1"]
    jid = await make_job(rig, concurrency=2)
    issued = (await rig.selector.select_once(now + 0.1))[jid]
    assert [t.device_id for t in issued] == ["d1"]  # the departed device gets no task
    # telemetry well after the goodbye means the device is back
    again = now + OFFLINE_GRACE_S + 1
    await fleet.write_telemetry([decode(tel("d0"), Telemetry)], now=again)
    assert "d0" in await fleet.live_ids(again)
    view = (await fleet.views(["d0"], again))[0]
    assert view.online


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
