"""Sync rounds in the ingest path: over-selection, closing by target or deadline, a slot
held by a claim Kafka did not confirm, late uploads refused (real Redis, in-memory stand-ins)."""

from __future__ import annotations

import time

import pytest

from schemas.messages import encode
from tests.test_coordinator_ingest_support import (
    Rig,
    acks,
    add_devices,
    make_sync_job,
    rig,
    update_for,
)
from tests.test_coordinator_support import redis_url

__all__ = ["redis_url", "rig"]  # fixtures


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
