"""Telemetry and status (LWT) ingest, task responses, lease expiry, the task dispatcher
and the selection lock, on a real Redis with in-memory Kafka/MQTT stand-ins."""

from __future__ import annotations

import time

from coordinator.metrics import counter_value
from schemas.messages import DeviceStatus, Task, TaskResponse, Telemetry, decode, encode
from tests.test_coordinator_ingest_support import (
    Rig,
    acks,
    add_devices,
    make_job,
    rig,
    tel,
    update_for,
)
from tests.test_coordinator_support import Published, redis_url

__all__ = ["redis_url", "rig"]  # fixtures


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


async def test_dispatcher_pushes_tasks_and_skips_stale_or_bad() -> None:
    from coordinator.dispatcher import dispatch_record, with_token
    from tests.test_coordinator_support import metrics

    pub, key = Published(), bytes(range(32))
    now = time.time()
    task = Task(task_id="t1", job_id="j", device_id="d7", model_name="m", upload_token="",
                issued_ts=now, deadline_ts=now + 10)  # fmt: skip
    assert await dispatch_record(encode(task), pub, metrics(), now, key=key)
    assert pub.items == [("fleet/d7/task", encode(with_token(task, key)), 1)]
    assert not await dispatch_record(encode(task), pub, metrics(), now + 11, key=key)
    assert not await dispatch_record(b"\xc1", pub, metrics(), now, key=key)
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
