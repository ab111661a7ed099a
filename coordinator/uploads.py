"""Upload ingest: check an ``Update`` against its task, split it into ``ShardUpdate``s.

``check_upload`` and ``split_update`` are pure; ``UploadHandler`` produces to Kafka
(acks=all, idempotent) and acknowledges the device only after every shard record is
acknowledged by the broker.

Tasks of a synchronous round (``TaskRecord.round_no``) are claimed with
``TaskStore.claim_in_round``, which counts the upload against its round in the same atomic
step: a round admits at most its ``target`` uploads; the rest are refused
(``round_closed``) and their tasks expired, so nothing beyond ``K`` reaches Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from coordinator.errors import UploadRejected
from coordinator.fleet import FleetStore
from coordinator.jobs import JobStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.tasks import TaskRecord, TaskStore, token_matches
from schemas.messages import ShardUpdate, Update, UploadAck, encode

log = logging.getLogger(__name__)

LATE_OK = ("offered", "accepted", "expired")


def check_upload(
    rec: TaskRecord | None, upd: Update, topic_device: str, bounds: list[int] | None
) -> Literal["accept", "duplicate"]:
    """Decide an upload; any refusal raises ``UploadRejected`` with a reason code.

    Late updates for an expired lease are accepted (once): the aggregator weights them
    by staleness or rejects them past ``max_staleness``. Not for tasks of a sync round
    (``round_no``): their lease expires when the round closes (``round_closed``).
    """
    if upd.device_id != topic_device:
        raise UploadRejected("device_mismatch", "topic device != payload device")
    if rec is None:
        raise UploadRejected("unknown_task", upd.task_id)
    if rec.device_id != upd.device_id:
        raise UploadRejected("wrong_device", "task was given to another device")
    if rec.job_id != upd.job_id:
        raise UploadRejected("wrong_job", "task belongs to another job")
    if not token_matches(upd.upload_token, rec.token_sha):
        raise UploadRejected("bad_token", "upload token does not match the task")
    if rec.state in ("uploaded", "uploading"):
        if rec.update_id != upd.update_id:
            raise UploadRejected("token_used", "task already has an upload")
        if rec.state == "uploaded":
            return "duplicate"
        # "uploading": a previous attempt was claimed but not confirmed; produce again
        # (aggregators dedupe by update_id).
    elif rec.state == "expired" and rec.round_no:
        # A sync task expires only when its round closed (full or past its deadline); a
        # late update would land on the aggregator's next round (FedAvg ``wrong_round``).
        raise UploadRejected("round_closed", f"round {rec.round_no} is closed")
    elif rec.state not in LATE_OK:
        raise UploadRejected(f"task_{rec.state}", f"task is {rec.state}")
    if bounds is None:
        raise UploadRejected("unknown_job", upd.job_id)
    shards = len(bounds) - 1
    for c in upd.chunks:
        if c.shard >= shards:
            raise UploadRejected("shape", f"chunk shard {c.shard} >= {shards}")
        if (c.start, c.stop) != (bounds[c.shard], bounds[c.shard + 1]):
            raise UploadRejected("shape", f"chunk {c.shard} bounds do not match the job")
    return "accept"


def split_update(upd: Update, accepted_ts: float) -> list[ShardUpdate]:
    return [
        ShardUpdate(
            update_id=upd.update_id,
            task_id=upd.task_id,
            job_id=upd.job_id,
            device_id=upd.device_id,
            shard=c.shard,
            start=c.start,
            stop=c.stop,
            base_version=c.base_version,
            num_samples=upd.num_samples,
            payload=c.payload,
            accepted_ts=accepted_ts,
        )
        for c in upd.chunks
    ]


class ShardProducer(Protocol):
    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int
    ) -> Awaitable[object]: ...


Publish = Callable[[str, bytes, int], Awaitable[None]]


class UploadHandler:
    def __init__(
        self,
        *,
        tasks: TaskStore,
        jobs: JobStore,
        fleet: FleetStore,
        producer: ShardProducer,
        updates_topic: str,
        publish: Publish,
        metrics: CoordinatorMetrics,
        on_uploaded: Callable[[str], None] | None = None,
    ) -> None:
        self.tasks = tasks
        self.jobs = jobs
        self.fleet = fleet
        self.producer = producer
        self.topic = updates_topic
        self.publish = publish
        self.metrics = metrics
        self.on_uploaded = on_uploaded
        self._bounds: dict[str, list[int]] = {}

    async def _job_bounds(self, job_id: str) -> list[int] | None:
        b = self._bounds.get(job_id)
        if b is None and await self.jobs.exists(job_id):
            b = self._bounds[job_id] = list((await self.jobs.get(job_id)).spec.shard_bounds)
        return b

    async def _ack(self, upd: Update, status: str, reason: str = "") -> None:
        ack = UploadAck(
            update_id=upd.update_id,
            task_id=upd.task_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        self.metrics.uploads.labels(status=status).inc()
        await self.publish(f"fleet/{upd.device_id}/ack", encode(ack), 1)

    async def _round_closed(self, rec: TaskRecord, upd: Update) -> str:
        """The task's round had no slot left: its task is now expired; refuse the upload."""
        self.metrics.rejected.labels(source="update", reason="round_closed").inc()
        await self.tasks.bump(rec.job_id, "updates_rejected")
        await self.tasks.bump(rec.job_id, "tasks_round_closed")
        await self.fleet.release_task(
            rec.device_id, rec.task_id, contributed=False, outcome="round_closed"
        )
        await self._ack(upd, "rejected", "round_closed")
        if self.on_uploaded is not None:
            self.on_uploaded(rec.job_id)  # the round is full: let the selector close it
        return "rejected"

    async def handle(self, upd: Update, topic_device: str) -> str:
        """Process one decoded update; returns the ack status sent (or 'dropped')."""
        rec = await self.tasks.get(upd.task_id)
        bounds = await self._job_bounds(upd.job_id) if rec is not None else None
        try:
            verdict = check_upload(rec, upd, topic_device, bounds)
        except UploadRejected as exc:
            self.metrics.rejected.labels(source="update", reason=exc.code).inc()
            if rec is not None:
                await self.tasks.bump(rec.job_id, "updates_rejected")
            if exc.code == "device_mismatch":
                return "dropped"  # never answer on a topic the sender does not own
            await self._ack(upd, "rejected", exc.code)
            return "rejected"
        assert rec is not None
        if verdict == "duplicate":
            await self._ack(upd, "duplicate")
            return "duplicate"
        now = time.time()
        if rec.state != "uploading":
            # Claim the one-use token before producing, so two different updates for one
            # task can never both reach Kafka; a sync round's task also takes a round slot.
            if rec.round_no:
                claim, _ = await self.tasks.claim_in_round(rec, upd.update_id, now)
                if claim == "round_closed":
                    return await self._round_closed(rec, upd)
                ok = claim == "ok"
            else:
                ok, _ = await self.tasks.transition(
                    rec, "uploading", LATE_OK, update_id=upd.update_id,
                    late=str(rec.state == "expired"),
                )  # fmt: skip
            if not ok:
                return await self.handle(upd, topic_device)  # state moved: decide again
        futs = []
        for su in split_update(upd, now):
            fut = await self.producer.send(
                self.topic, value=encode(su), key=upd.update_id.encode(), partition=su.shard
            )
            futs.append(fut)
        await asyncio.gather(*futs)  # every record acked by Kafka (acks=all)
        ok, _ = await self.tasks.transition(rec, "uploaded", ("uploading",), uploaded_ts=repr(now))
        if not ok:
            await self._ack(upd, "duplicate")  # a concurrent retry confirmed it first
            return "duplicate"
        await self.fleet.release_task(
            upd.device_id, rec.task_id, contributed=True,
            outcome="late_upload" if rec.state == "expired" else "uploaded",
        )  # fmt: skip
        await self.tasks.bump(rec.job_id, "updates_accepted")
        if rec.state == "expired":
            await self.tasks.bump(rec.job_id, "late_updates")
        await self._ack(upd, "accepted")
        if self.on_uploaded is not None:
            self.on_uploaded(rec.job_id)
        return "accepted"
