"""Upload ingest: check an ``Update`` against its task, split it into ``ShardUpdate``s.

``check_upload`` and ``split_update`` are pure; ``UploadHandler`` produces to Kafka
(acks=all, idempotent) and acknowledges the device only after every shard record is
acknowledged by the broker.

Everything that could make a shard refuse an update is decided here, once for the whole
update and *before* the device is acknowledged (``check_upload``, ``check_bases``,
``check_payloads``): one chunk per shard, each frame decodes to finite values of the right
length, and no base is more than ``max_staleness`` versions behind the newest version of its
shard this coordinator knows. Aggregator shards then apply every acknowledged update (see
``aggregator.bases``), so all shards of a job fold in the same set of updates.

Tasks of a synchronous round (``TaskRecord.round_no``) are claimed with
``TaskStore.claim_in_round``, which counts the upload against its round in the same atomic
step: a round admits at most its ``target`` uploads; the rest are refused
(``round_closed``) and their tasks expired, so nothing beyond ``K`` reaches Kafka.

Redis round trips of an accepted upload (the job spec is cached in memory): read the task,
claim it (``uploading``, one script), produce to Kafka, confirm (one script: task
``uploaded``, device released, job counters) — 3 (``tests/test_coordinator_ingest.py``
counts them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from coordinator.errors import NotFound, UploadRejected
from coordinator.fleet import FleetStore
from coordinator.jobs import JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.tasks import TaskRecord, TaskStore, foreign_task, token_matches
from schemas import codec
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, JobSpec, ShardUpdate, Update, UploadAck, encode

log = logging.getLogger(__name__)

LATE_OK = ("offered", "accepted", "expired")


def check_upload(
    rec: TaskRecord | None, upd: Update, topic_device: str, bounds: list[int] | None
) -> Literal["accept", "duplicate"]:
    """Decide an upload; any refusal raises ``UploadRejected`` with a reason code.

    Late updates for an expired lease are accepted (once) if :func:`check_bases` admits
    them; the aggregators weight them by staleness. Not for tasks of a sync round
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
    if rec.kind != "train":
        raise UploadRejected("wrong_kind", f"an {rec.kind} task is answered by a report")
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
    if len(upd.chunks) != shards:  # chunk shards are unique (schema) and < shards
        raise UploadRejected("shape", f"{len(upd.chunks)} chunks for {shards} shards")
    size, bound = sum(len(c.payload) for c in upd.chunks), max_update_bytes(bounds)
    if size > bound:
        raise UploadRejected("too_large", f"{size} payload bytes > {bound} for this job")
    return "accept"


def max_update_bytes(bounds: list[int]) -> int:
    """The per-job bound on an update's frames: every codec setting stays below 5 bytes a
    parameter (dense float32 is 4; top-k adds its index planes) plus headers per shard."""
    return 5 * bounds[-1] + 4096 * (len(bounds) - 1)


def check_bases(upd: Update, newest: list[int], max_staleness: int) -> None:
    """Refuse an update whose base on some shard is more than ``max_staleness`` versions
    behind ``newest[shard]``, the newest announced version this coordinator knows.

    A base ahead of ``newest`` came from a coordinator that has read further; it is let
    through (the shard has it). The bound is per shard, the verdict for the whole update.
    """
    for c in upd.chunks:
        behind = newest[c.shard] - c.base_version
        if behind > max_staleness:
            raise UploadRejected(
                "too_stale",
                f"shard {c.shard}: base {c.base_version} is {behind} versions behind "
                f"{newest[c.shard]} (max_staleness {max_staleness})",
            )


def check_payloads(upd: Update, max_bytes: int = UPDATE_MAX_BYTES) -> None:
    """Refuse an update any of whose frames a shard would refuse (codec, shape, NaN/Inf)."""
    for c in upd.chunks:
        try:
            codec.decode(c.payload, c.stop - c.start, max_frame_bytes=max_bytes)
        except SchemaError as exc:
            raise UploadRejected(exc.reason, f"chunk {c.shard}: {exc.detail}") from None


def split_update(upd: Update, accepted_ts: float, seen: list[int] | None) -> list[ShardUpdate]:
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
            seen_version=-1 if seen is None else seen[c.shard],
        )
        for c in upd.chunks
    ]


class ShardProducer(Protocol):
    async def send(
        self, topic: str, value: bytes, key: bytes, partition: int
    ) -> Awaitable[object]: ...


Publish = Callable[[str, bytes, int], Awaitable[None]]
# where an upload's answer goes: None = MQTT ``fleet/{device}/ack``; the HTTP upload route
# passes its own, so the ack is the response body
Reply = Callable[[UploadAck], Awaitable[None]] | None
# the newest announced version of each shard of a job this coordinator knows (None: none)
NewestVersions = Callable[[JobSpec], Awaitable[list[int] | None]]


class UploadHandler:
    def __init__(
        self,
        *,
        tasks: TaskStore,
        jobs: JobStore,
        fleet: FleetStore,
        stats: JobStatsStore,
        producer: ShardProducer,
        updates_topic: str,
        publish: Publish,
        metrics: CoordinatorMetrics,
        on_uploaded: Callable[[str], None] | None = None,
        newest_versions: NewestVersions | None = None,
        deployment: str = "",
    ) -> None:
        """``deployment``: this deployment's tag in task ids (``tasks.deployment_tag``): an
        upload for another deployment's task (a second coordinator on the same broker) is
        left for that one to answer, never refused as ``unknown_task`` here."""
        self.tasks = tasks
        self.jobs = jobs
        self.fleet = fleet
        self.stats = stats
        self.producer = producer
        self.topic = updates_topic
        self.publish = publish
        self.metrics = metrics
        self.on_uploaded = on_uploaded
        self.newest_versions = newest_versions
        self.deployment = deployment
        self._specs: dict[str, JobSpec] = {}

    async def _job_spec(self, job_id: str) -> JobSpec | None:
        spec = self._specs.get(job_id)
        if spec is None:
            try:
                spec = self._specs[job_id] = (await self.jobs.get(job_id)).spec
            except NotFound:
                return None
        return spec

    async def _admit(self, rec: TaskRecord, upd: Update, spec: JobSpec) -> list[int] | None:
        """Checks a shard would otherwise fail after the ack; returns the versions seen."""
        if sum(len(c.payload) for c in upd.chunks) > 1 << 18:
            await asyncio.to_thread(check_payloads, upd)
        else:
            check_payloads(upd)
        if rec.round_no or rec.state == "uploading" or self.newest_versions is None:
            # a sync round's staleness is its round (FedAvg wrong_round); an "uploading"
            # retry was admitted before and may already be on Kafka: never refuse it now
            return None
        newest = await self.newest_versions(spec)
        if newest is not None and len(newest) == len(spec.shard_bounds) - 1:
            check_bases(upd, newest, spec.strategy.max_staleness)
            return newest
        return None

    async def _ack(self, upd: Update, status: str, reason: str = "", reply: Reply = None) -> None:
        ack = UploadAck(
            update_id=upd.update_id,
            task_id=upd.task_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        self.metrics.uploads.labels(status=status).inc()
        if reply is not None:
            await reply(ack)
        else:
            await self.publish(f"fleet/{upd.device_id}/ack", encode(ack), 1)

    async def _refused(self, rec: TaskRecord, exc: UploadRejected) -> None:
        """An upload refused for its content (too stale, bad frame): abort its task, with
        the reason, and free the device for another one."""
        ok, _ = await self.tasks.transition(
            rec, "aborted", LATE_OK, reason=f"upload {exc.code}: {exc.detail}"[:200]
        )
        if ok:
            await self.stats.bump(rec.job_id, f"updates_{exc.code}")
            await self.fleet.release_task(
                rec.device_id, rec.task_id, contributed=False, outcome=f"upload_{exc.code}"
            )

    async def _round_closed(self, rec: TaskRecord, upd: Update, reply: Reply) -> str:
        """The task's round had no slot left: its task is now expired; refuse the upload."""
        self.metrics.rejected.labels(source="update", reason="round_closed").inc()
        await self.stats.bump_many(rec.job_id, "updates_rejected", "tasks_round_closed")
        await self.fleet.release_task(
            rec.device_id, rec.task_id, contributed=False, outcome="round_closed"
        )
        await self._ack(upd, "rejected", "round_closed", reply)
        if self.on_uploaded is not None:
            self.on_uploaded(rec.job_id)  # the round is full: let the selector close it
        return "rejected"

    async def handle(self, upd: Update, topic_device: str, reply: Reply = None) -> str:
        """Process one decoded update; returns the ack status sent (or 'dropped'). The ack
        goes to ``reply`` when given (HTTP), else to the device's MQTT ack topic."""
        rec = await self.tasks.get(upd.task_id)
        if rec is None and self.deployment and foreign_task(upd.task_id, self.deployment):
            self.metrics.rejected.labels(source="update", reason="foreign_task").inc()
            return "dropped"  # its own deployment's coordinator answers it
        spec = await self._job_spec(upd.job_id) if rec is not None else None
        seen: list[int] | None = None
        verdict: str = ""
        try:
            bounds = None if spec is None else list(spec.shard_bounds)
            verdict = check_upload(rec, upd, topic_device, bounds)
            if verdict == "accept":
                assert rec is not None and spec is not None
                seen = await self._admit(rec, upd, spec)
        except UploadRejected as exc:
            self.metrics.rejected.labels(source="update", reason=exc.code).inc()
            if rec is not None:
                await self.stats.bump(rec.job_id, "updates_rejected")
            if exc.code == "device_mismatch":
                return "dropped"  # never answer on a topic the sender does not own
            if rec is not None and verdict == "accept":  # refused on content: the task ends
                await self._refused(rec, exc)
            await self._ack(upd, "rejected", exc.code, reply)
            return "rejected"
        assert rec is not None
        if verdict == "duplicate":
            await self._ack(upd, "duplicate", reply=reply)
            return "duplicate"
        now = time.time()
        if rec.state != "uploading":
            # Claim the one-use token before producing, so two different updates for one
            # task can never both reach Kafka; a sync round's task also takes a round slot.
            if rec.round_no:
                claim, _ = await self.tasks.claim_in_round(rec, upd.update_id, now)
                if claim == "round_closed":
                    return await self._round_closed(rec, upd, reply)
                ok = claim == "ok"
            else:
                ok, _ = await self.tasks.transition(
                    rec, "uploading", LATE_OK, update_id=upd.update_id,
                    late=str(rec.state == "expired"),
                )  # fmt: skip
            if not ok:
                return await self.handle(upd, topic_device, reply)  # state moved: decide again
        futs = []
        for su in split_update(upd, now, seen):
            fut = await self.producer.send(
                self.topic, value=encode(su), key=upd.update_id.encode(), partition=su.shard
            )
            futs.append(fut)
        await asyncio.gather(*futs)  # every record acked by Kafka (acks=all)
        # one script: task uploaded, device released (history uploaded / late_upload),
        # updates_accepted (+ late_updates) bumped
        if not await self.tasks.confirm_upload(rec, now, late=rec.state == "expired"):
            await self._ack(upd, "duplicate", reply=reply)  # a concurrent retry confirmed it
            return "duplicate"
        await self._ack(upd, "accepted", reply=reply)
        if self.on_uploaded is not None:
            self.on_uploaded(rec.job_id)
        return "accepted"


def replying(
    handler: UploadHandler, slots: asyncio.Semaphore
) -> Callable[[Update], Awaitable[UploadAck]]:
    """An upload path whose ack is returned instead of published (``POST /v1/uploads``),
    sharing the MQTT path's bound on uploads in flight (``slots``)."""

    async def upload(upd: Update) -> UploadAck:
        got: list[UploadAck] = []

        async def reply(ack: UploadAck) -> None:
            got.append(ack)

        async with slots:
            await handler.handle(upd, upd.device_id, reply)
        if not got:  # pragma: no cover - only a topic/device mismatch is dropped unanswered
            return UploadAck(update_id=upd.update_id, task_id=upd.task_id, status="rejected",
                             reason="dropped")  # fmt: skip
        return got[-1]

    return upload

