"""Pure per-partition state machine: validate, dedupe, decode, apply, decide publication.

No Kafka here. :class:`PartitionState` owns everything one ``fl.updates`` partition (shard
index ``s``) holds across jobs; the worker feeds it raw records in offset order and acts on
the returned :class:`Outcome` (metrics, publish). ``checkpoint()``/``restore()`` give the
exact state to resume from, including the next offset and the applied-id window.

Announcement cadence (:class:`aggregator.job_shard.Cadence`): a new version is announced
when at least ``publish_every`` versions and at least ``min_interval_s`` of *stream time*
passed since the last regular announcement. Stream time is the running maximum of the
applied records' ``accepted_ts``, so the decision is a pure function of the checkpoint and
the records: a replay after a crash re-derives exactly the same announcements. The idle
announcement of the latest version (:meth:`PartitionState.announce_latest`, driven by the
worker's wall clock) is not re-derivable, so it goes to :attr:`PartitionState.held` and may
only be produced after a checkpoint that records it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aggregator.bases import BlobLoader
from aggregator.checkpoint import JobShardCheckpoint, PartitionCheckpoint
from aggregator.errors import CheckpointError, UpdateRejected
from aggregator.job_shard import JobShard, PendingVersion
from aggregator.strategies import StrategyOptions, Update
from aggregator.strategies.base import ChunkLike
from schemas import codec
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, JobSpec, ModelSpecMsg, ShardUpdate, decode

log = logging.getLogger("fedfleet.aggregator")

Status = Literal["applied", "buffered", "rejected", "duplicate"]


@dataclass(frozen=True, slots=True)
class Outcome:
    offset: int
    status: Status
    reason: str = ""
    job_id: str = ""
    update_id: str = ""
    staleness: int | None = None
    new_version: int | None = None
    publish: bool = False


def decode_update(raw: bytes, *, max_bytes: int = UPDATE_MAX_BYTES) -> ShardUpdate:
    """Strictly decode a ``ShardUpdate`` record; failures become :class:`UpdateRejected`."""
    try:
        return decode(raw, ShardUpdate, max_bytes=max_bytes)
    except SchemaError as exc:
        raise UpdateRejected(exc.reason, exc.detail) from None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A record whose message could not be decoded ahead of :meth:`PartitionState.handle`
    (the worker decodes the message first, to read its job id): ``handle`` counts
    ``error`` as the record's rejection. The payload is always decoded by ``handle``,
    after the shard/job/bounds/dedupe checks."""

    msg: ShardUpdate | None
    error: UpdateRejected | None = None


JobLookup = Callable[[str], JobSpec | None]


class PartitionState:
    """All jobs' state for partition ``shard`` of ``topic`` plus offsets and dedupe window."""

    def __init__(
        self,
        topic: str,
        shard: int,
        *,
        options: StrategyOptions | None = None,
        publish_every: int | None = None,
        dedupe_window: int = 100_000,
        max_update_bytes: int = UPDATE_MAX_BYTES,
        models_zstd_level: int = -1,
        min_publish_interval_s: float = 0.0,
        load_blob: BlobLoader | None = None,
        seen_window_s: float = 600.0,
        artifact_of: Callable[[ModelSpecMsg], bytes | None] | None = None,
    ) -> None:
        self.topic = topic
        self.artifact_of = artifact_of  # an onnx job's artifact (aggregator.artifacts)
        self.load_blob = load_blob  # reads base blobs from the checkpoint store
        self.seen_window_s = seen_window_s
        self.min_publish_interval_s = min_publish_interval_s
        self.models_zstd_level = models_zstd_level
        self.shard = shard
        self.options = options or StrategyOptions()
        self.publish_every_override = publish_every
        self.dedupe_window = dedupe_window
        self.max_update_bytes = max_update_bytes
        self.next_offset = 0
        self.jobs: dict[str, JobShard] = {}
        self.rejected: dict[str, int] = {}
        self._applied_ids: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, tuple[JobShardCheckpoint, dict[int, bytes]]] = {}
        self.outbox: list[PendingVersion] = []  # versions to announce; the worker drains it
        # idle announcements: produced only once a checkpoint recording them is written
        self.held: list[PendingVersion] = []
        self.dirty = False

    @property
    def key(self) -> str:
        return f"{self.topic}-{self.shard}"

    def job_shard(self, job: JobSpec) -> JobShard:
        """The job's state on this shard, created (or restored) on first use.

        A job created fresh queues its version 0 in :attr:`outbox`.
        """
        js = self.jobs.get(job.job_id)
        if js is not None:
            return js
        every = self.publish_every_override or job.publish_every
        js = JobShard(
            job,
            self.shard,
            publish_every=every,
            options=self.options,
            min_publish_interval_s=self.min_publish_interval_s,
            key=self.key,
            load_blob=self.load_blob,
            seen_window_s=self.seen_window_s,
            artifact=None if self.artifact_of is None else self.artifact_of(job.spec),
        )
        pending = self._pending.pop(job.job_id, None)
        if pending is not None:
            js.restore(*pending)
        else:  # fresh job: announce version 0 (a deterministic slice, always a base)
            js.mark_published(regular=True)
            self.outbox.append(js.pending_version(level=self.models_zstd_level))
        self.jobs[job.job_id] = js
        self.dirty = True
        return js

    def activate(self, job: JobSpec) -> None:
        """Create this shard's state for ``job`` if it is running and covers the shard."""
        if job.status == "running" and self.shard + 1 < len(job.shard_bounds):
            self.job_shard(job)

    def seen(self, update_id: str) -> bool:
        return update_id in self._applied_ids

    def _remember(self, update_id: str) -> None:
        self._applied_ids[update_id] = None
        while len(self._applied_ids) > self.dedupe_window:
            self._applied_ids.popitem(last=False)

    def _reject(self, offset: int, reason: str, msg: ShardUpdate | None) -> Outcome:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if msg is not None and msg.job_id in self.jobs:
            self.jobs[msg.job_id].rejected += 1
        return Outcome(
            offset,
            "rejected",
            reason,
            job_id=msg.job_id if msg else "",
            update_id=msg.update_id if msg else "",
        )

    def handle(self, raw: bytes | ShardUpdate | Decoded, offset: int, lookup: JobLookup) -> Outcome:
        """Process the record at ``offset`` (records must come in offset order).

        ``raw`` may be the record's bytes, its decoded message, or a :class:`Decoded`
        decode failure.
        """
        self.next_offset = offset + 1
        self.dirty = True
        msg: ShardUpdate | None = None
        try:
            if isinstance(raw, Decoded):
                msg = raw.msg
                if raw.error is not None:
                    raise raw.error
                assert msg is not None
            elif isinstance(raw, ShardUpdate):
                msg = raw
            else:
                msg = decode_update(raw, max_bytes=self.max_update_bytes)
            return self._handle(msg, offset, lookup)
        except UpdateRejected as exc:
            return self._reject(offset, exc.reason, msg)

    def _handle(self, msg: ShardUpdate, offset: int, lookup: JobLookup) -> Outcome:
        if msg.shard != self.shard:
            raise UpdateRejected("shard_mismatch", f"shard {msg.shard} on partition {self.shard}")
        job = lookup(msg.job_id)
        if job is None:
            raise UpdateRejected("unknown_job", msg.job_id)
        # A stopped job still applies what the coordinator accepted before the stop: a
        # ShardUpdate on Kafka is an acknowledged upload and must be applied exactly once.
        b = job.shard_bounds
        if self.shard + 1 >= len(b) or (msg.start, msg.stop) != (b[self.shard], b[self.shard + 1]):
            raise UpdateRejected("shape", f"chunk [{msg.start},{msg.stop}) != shard bounds")
        if self.seen(msg.update_id):
            self.rejected["duplicate"] = self.rejected.get("duplicate", 0) + 1
            return Outcome(offset, "duplicate", "duplicate", msg.job_id, msg.update_id)
        try:
            chunk: ChunkLike = codec.decode(
                msg.payload, msg.stop - msg.start, max_frame_bytes=self.max_update_bytes
            )
        except SchemaError as exc:
            raise UpdateRejected(exc.reason, exc.detail) from None
        js = self.job_shard(job)
        js.observe(msg)
        res = js.strategy.apply(Update(chunk, msg.base_version, msg.num_samples, msg.update_id))
        self._remember(msg.update_id)
        js.applied += 1
        js.staleness_sum += res.staleness
        js.cadence.tick(msg.accepted_ts)
        publish = False
        if res.new_version is not None and js.should_publish(res.new_version):
            publish = True
            js.mark_published(regular=True)
            self.outbox.append(js.pending_version(level=self.models_zstd_level))
        status: Status = "applied" if res.new_version is not None else "buffered"
        return Outcome(
            offset, status, "", msg.job_id, msg.update_id, res.staleness, res.new_version, publish
        )

    @property
    def unannounced(self) -> bool:
        """Some job's newest version has not been announced (nor queued for it)."""
        return any(js.unannounced for js in self.jobs.values())

    def announce_latest(self) -> int:
        """Announce every job's newest version now (idle flush); returns how many.

        The versions go to :attr:`held`, not :attr:`outbox`: the decision depends on the
        wall clock, not on the records, so a replay would not re-derive it. The worker
        writes a checkpoint (which records them as announced and keeps their slices as
        bases) and only then calls :meth:`release_held`.
        """
        n = 0
        for js in self.jobs.values():
            if js.unannounced:
                js.mark_published(regular=False)
                self.held.append(js.pending_version(level=self.models_zstd_level))
                n += 1
        if n:
            self.dirty = True
        return n

    def release_held(self) -> None:
        """A checkpoint covering the held announcements is durable: let them go out."""
        self.outbox.extend(self.held)
        self.held.clear()

    def checkpoint(self) -> tuple[PartitionCheckpoint, dict[str, bytes], list[str]]:
        """``(checkpoint, blobs to write first, blobs to delete after)``.

        Once it is written call :meth:`saved`; if writing fails, :meth:`forget_saved_blobs`
        so the next attempt plans the same blobs again.
        """
        jobs: list[JobShardCheckpoint] = []
        blobs: dict[str, bytes] = {}
        obsolete: list[str] = []
        for js in self.jobs.values():
            jc, new, old = js.checkpoint()
            jobs.append(jc)
            blobs.update(new)
            obsolete += old
        jobs += [jc for jc, _ in self._pending.values()]
        ckpt = PartitionCheckpoint(
            topic=self.topic,
            partition=self.shard,
            next_offset=self.next_offset,
            jobs=jobs,
            applied_ids=list(self._applied_ids),
            rejected=dict(self.rejected),
        )
        return ckpt, blobs, obsolete

    def saved(self) -> None:
        """The checkpoint from :meth:`checkpoint` is durable."""
        for js in self.jobs.values():
            js.saved()

    def forget_saved_blobs(self) -> None:
        for js in self.jobs.values():
            js.bases.failed()

    def restore(self, ck: PartitionCheckpoint, load_blob: BlobLoader) -> None:
        """Load a checkpoint (and its history blobs); job slices are rebuilt lazily when
        their JobSpec is known)."""
        if self.load_blob is None:
            self.load_blob = load_blob
        pending: dict[str, tuple[JobShardCheckpoint, dict[int, bytes]]] = {}
        for jc in ck.jobs:
            hist: dict[int, bytes] = {}
            for v in jc.history:
                key = f"{self.key}.{jc.job_id}.h{v}"
                blob = load_blob(key)
                if blob is None:
                    raise CheckpointError(f"history blob {key} missing")
                hist[v] = blob
            pending[jc.job_id] = (jc, hist)
        self.next_offset = ck.next_offset
        self.jobs = {}
        self._pending = pending
        self._applied_ids = OrderedDict((u, None) for u in ck.applied_ids)
        self.rejected = dict(ck.rejected)
        self.dirty = False
