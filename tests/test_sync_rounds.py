"""Synchronous rounds admit at most K uploads: on the real stack (Kafka, Mosquitto, Redis).

A sync FedAvg round of size ``K`` invites more devices than it needs; the first ``K``
uploads take the round's slots (``TaskStore.claim_in_round``, atomic in Redis), every
other one is refused with ``UploadAck(rejected, "round_closed")``, counted, and its task
expired — so nothing past ``K`` reaches ``fl.updates``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from coordinator.errors import UploadRejected
from coordinator.keys import Keys
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.tasks import TaskRecord, token_sha
from coordinator.uploads import check_upload
from schemas.messages import ShardUpdate, Task, Update, UpdateChunk, UploadAck, decode
from tests.test_coordinator_integration import Device, coordinator_settings, eventually
from tests.test_coordinator_support import frame

AUTH = {"Authorization": "Bearer adm"}


def sync_job(prefix: str, k: int, over_selection: float) -> dict[str, Any]:
    """A sync FedAvg job whose rounds never time out or give up within a test."""
    return {
        "model_name": f"{prefix}sync", "shards": 2, "concurrency": k,
        "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
        "strategy": {"name": "fedavg", "buffer_size": k},
        "selection": {"mode": "sync", "over_selection": over_selection,
                      "round_deadline_s": 600.0, "round_grace_s": 600.0},
    }  # fmt: skip


def update_for(task: Task, bounds: list[int]) -> Update:
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
    return Update(
        update_id=f"u-{task.task_id}", task_id=task.task_id, job_id=task.job_id,
        device_id=task.device_id, upload_token=task.upload_token, num_samples=10,
        chunks=chunks, sent_ts=time.time(),
    )  # fmt: skip


def isolated_metrics() -> CoordinatorMetrics:
    return CoordinatorMetrics(registry=CollectorRegistry())


async def online(coord: Coordinator, devs: list[Device]) -> None:
    for d in devs:
        await d.hello()

    async def all_live() -> bool:
        return len(await coord.fleet.live_ids()) == len(devs)

    await eventually(all_live)


async def first(d: Device, kind: str, typ: type[Any], n: int = 1) -> list[Any]:
    """The first ``n`` messages of ``kind`` the device received (waits for them)."""

    async def got() -> list[Any] | None:
        msgs = d.got(kind, typ)
        return msgs[:n] if len(msgs) >= n else None

    return await eventually(got)


async def shard_updates(s: CoordinatorSettings) -> list[ShardUpdate]:
    """Every record on ``fl.updates`` up to its current end (exact: no waiting for a count)."""
    c = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False
    )
    await c.start()
    try:
        parts = [TopicPartition(s.updates_topic, p) for p in range(s.max_shards)]
        c.assign(parts)
        await c.seek_to_beginning(*parts)
        end = await c.end_offsets(parts)
        out: list[ShardUpdate] = []
        deadline = time.monotonic() + 30
        while [p for p in parts if await c.position(p) < end[p]]:
            assert time.monotonic() < deadline, "could not read fl.updates to its end"
            for recs in (await c.getmany(*parts, timeout_ms=500)).values():
                out += [decode(r.value, ShardUpdate) for r in recs if r.value is not None]
        return out
    finally:
        await c.stop()


def reason_of(coord: Coordinator, task_id: str) -> Callable[[], Awaitable[str]]:
    async def read() -> str:
        r: Any = Redis.from_url(coord.settings.redis_url, decode_responses=True)
        try:  # the test's own client: the reason is not part of TaskRecord
            key = Keys(coord.settings.key_prefix).task(task_id)
            return str(await r.hget(key, "reason") or "")
        finally:
            await r.aclose()

    return read


def test_check_upload_refuses_a_closed_sync_round_task() -> None:
    """Pure: an expired task of a sync round is refused (``round_closed``); an expired
    async task still takes its one late update."""
    now = time.time()
    chunk = UpdateChunk(shard=0, start=0, stop=4, base_version=0, payload=b"x")
    upd = Update(update_id="u1", task_id="t1", job_id="j", device_id="d", upload_token="tok",
                 num_samples=1, sent_ts=now, chunks=[chunk])  # fmt: skip
    rec = TaskRecord(task_id="t1", job_id="j", device_id="d", token_sha=token_sha("tok"),
                     state="expired", issued_ts=now, deadline_ts=now)  # fmt: skip
    assert check_upload(rec, upd, "d", [0, 4]) == "accept"
    in_round = dataclasses.replace(rec, round_no=2)
    with pytest.raises(UploadRejected) as e:
        check_upload(in_round, upd, "d", [0, 4])
    assert e.value.code == "round_closed"
    done = dataclasses.replace(in_round, state="uploaded", update_id="u1")
    assert check_upload(done, upd, "d", [0, 4]) == "duplicate"  # re-send: still acked


@pytest.mark.integration
async def test_sync_round_accepts_k_uploads_and_refuses_the_rest(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    """K=3, 5 invited, all 5 upload at once over MQTT: 3 accepted, 2 refused
    (``round_closed``), counted, their tasks expired and devices released, only 3 updates
    on ``fl.updates``, no task re-issued; re-sends get the same answers."""
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    m = isolated_metrics()
    ids = [f"{unique_prefix.strip('.')}-d{i}" for i in range(5)]
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s, metrics=m))
        devs = [await ex.enter_async_context(Device(i, s.mqtt_host, s.mqtt_port)) for i in ids]
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        await online(coord, devs)
        r = await http.post("/v1/jobs", json=sync_job(unique_prefix, 3, 1.5), headers=AUTH)
        assert r.status_code == 201, r.text
        jid, bounds = r.json()["job_id"], r.json()["shard_bounds"]
        tasks = {d.id: (await first(d, "task", Task))[0] for d in devs}  # all 5 invited
        rnd = await coord.rounds.get(jid)
        assert (rnd["round"], rnd["target"], rnd["invited"], rnd["taken"]) == ("1", "3", "5", "0")

        updates = {d.id: update_for(tasks[d.id], bounds) for d in devs}
        await asyncio.gather(*(d.send("update", updates[d.id]) for d in devs))
        acks = {d.id: (await first(d, "ack", UploadAck))[0] for d in devs}
        assert Counter(a.status for a in acks.values()) == {"accepted": 3, "rejected": 2}
        refused = [i for i, a in acks.items() if a.status == "rejected"]
        won = [i for i, a in acks.items() if a.status == "accepted"]
        assert {acks[i].reason for i in refused} == {"round_closed"}

        # counted: Prometheus by reason, upload outcomes, job stats
        assert counter_value(m.rejected, source="update", reason="round_closed") == 2
        assert counter_value(m.uploads, status="accepted") == 3
        assert counter_value(m.uploads, status="rejected") == 2
        text = (await http.get("/metrics")).text
        assert 'fedfleet_coord_rejected_total{reason="round_closed",source="update"} 2.0' in text

        # terminal tasks, released devices, nothing leased, the round closed at K
        for i in won:
            assert (await coord.tasks.get(tasks[i].task_id)).state == "uploaded"  # type: ignore[union-attr]
        for i in refused:
            rec = await coord.tasks.get(tasks[i].task_id)
            assert rec is not None and rec.state == "expired" and rec.round_no == 1
            assert await reason_of(coord, rec.task_id)() == "round_closed"
            assert (await coord.fleet.history(i))[0]["outcome"] == "round_closed"
        for i in ids:
            dev = await coord.fleet.get(i)
            assert dev is not None and dev["current_task"] is None
        assert await coord.tasks.active_count(jid) == 0

        async def closed() -> dict[str, str] | None:
            h: dict[str, str] = await coord.rounds.get(jid)
            return h if h.get("closed") else None

        rnd = await eventually(closed)
        assert rnd["round"] == "1" and rnd["taken"] == "3"
        on_kafka = await shard_updates(s)
        assert sorted((u.update_id, u.shard) for u in on_kafka) == sorted(
            (updates[i].update_id, sh) for i in won for sh in (0, 1))  # fmt: skip

        # re-sends from the outbox: the accepted one is still acked, the refused one
        # refused again; nothing more is produced
        await devs[ids.index(won[0])].send("update", updates[won[0]])
        await devs[ids.index(refused[0])].send("update", updates[refused[0]])
        (_, again) = await first(devs[ids.index(won[0])], "ack", UploadAck, 2)
        assert again.status == "duplicate"
        (_, again) = await first(devs[ids.index(refused[0])], "ack", UploadAck, 2)
        assert (again.status, again.reason) == ("rejected", "round_closed")
        assert len(await shard_updates(s)) == 6

        stats = (await http.get(f"/v1/jobs/{jid}")).json()["stats"]
        assert stats["updates_accepted"] == 3 and stats["updates_rejected"] == 3
        assert stats["tasks_issued"] == 5 and stats["tasks_round_closed"] == 2
        # the model did not move (no aggregator here): no round 2, no re-issued task
        await coord.selector.locked_pass()
        assert all(len(d.got("task", Task)) == 1 for d in devs)


@pytest.mark.integration
async def test_round_slots_are_race_free_across_coordinators_and_a_restart(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    """K=4, 10 invited. Two uploads are accepted, the coordinator restarts, then two
    coordinators race every upload (each sent twice at once): exactly two more are
    accepted — the count lives in Redis — and exactly 4 update ids reach Kafka."""
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    ids = [f"{unique_prefix.strip('.')}-d{i}" for i in range(10)]
    async with AsyncExitStack() as ex:
        devs = [await ex.enter_async_context(Device(i, s.mqtt_host, s.mqtt_port)) for i in ids]
        async with (
            Coordinator(s, metrics=isolated_metrics()) as c0,
            httpx.AsyncClient(base_url=c0.rest_url) as http,
        ):
            await online(c0, devs)
            r = await http.post("/v1/jobs", json=sync_job(unique_prefix, 4, 2.5), headers=AUTH)
            assert r.status_code == 201, r.text
            jid, bounds = r.json()["job_id"], r.json()["shard_bounds"]
            tasks = [(await first(d, "task", Task))[0] for d in devs]
            updates = [update_for(t, bounds) for t in tasks]
            for u in updates[:2]:
                assert await c0.uploads.handle(u, u.device_id) == "accepted"

        m1, m2 = isolated_metrics(), isolated_metrics()
        async with Coordinator(s, metrics=m1) as c1, Coordinator(s, metrics=m2) as c2:
            assert (await c1.rounds.get(jid))["taken"] == "2"  # survived the restart
            calls = [(c1 if i % 2 else c2).uploads.handle(u, u.device_id)
                     for i, u in enumerate(updates + updates)]  # fmt: skip
            results = await asyncio.gather(*calls)
            by_update: dict[str, list[str]] = {}
            for u, res in zip(updates + updates, results, strict=True):
                by_update.setdefault(u.update_id, []).append(res)
            for u in updates[:2]:  # accepted before the restart: still acked
                assert by_update[u.update_id] == ["duplicate", "duplicate"]
            fresh = {u.update_id for u in updates[2:]}
            ok = {uid for uid in fresh if "accepted" in by_update[uid]}
            assert len(ok) == 2
            for uid in ok:  # the copy that did not confirm it is a duplicate, never refused
                assert sorted(by_update[uid]) == ["accepted", "duplicate"]
            for uid in fresh - ok:
                assert by_update[uid] == ["rejected", "rejected"]
            n_refused = sum(
                counter_value(m.rejected, source="update", reason="round_closed") for m in (m1, m2)
            )
            assert n_refused == 12
            assert (await c1.rounds.get(jid))["taken"] == "4"
            states = Counter([(await c1.tasks.get(t.task_id)).state for t in tasks])  # type: ignore[union-attr]
            assert states == {"uploaded": 4, "expired": 6}
            assert await c1.tasks.active_count(jid) == 0
            on_kafka = {u.update_id for u in await shard_updates(s)}
            assert on_kafka == {u.update_id for u in updates[:2]} | ok
            assert (await c1.stats.stats(jid))["updates_accepted"] == 4
