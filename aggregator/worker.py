"""The Kafka shell around :class:`aggregator.shard.PartitionState`.

``AggregatorWorker`` reads ``{prefix}jobs`` from the beginning (manual assignment), joins
the consumer group on ``{prefix}updates`` (partition s = shard s), feeds records in offset
order to the pure partition state, publishes ``ShardVersion`` events on ``{prefix}models``,
writes a checkpoint per partition and only then commits offsets. On assignment it loads the
partition's checkpoint and seeks to the offset stored in it (the beginning if none): the
checkpoint, not the committed offset, is the source of truth, so every record's effect is
applied exactly once. ``fl.models`` events are at-least-once with deterministic content
(a replay after a crash re-announces the same version with the same slice).

Regular announcements follow the record stream (``PartitionState`` decides them from the
records' timestamps) and are produced before the batch's checkpoint: a replay re-derives
them. When a caught-up partition has been quiet for ``min_publish_interval_s`` (and on
``drain``/``stop``), the newest version is announced anyway; that decision depends on the
wall clock, so it is checkpointed first and produced after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from aggregator import checkpoint as ck
from aggregator import clients
from aggregator.artifacts import ArtifactCache
from aggregator.checkpoint import CheckpointStore, FileCheckpointStore
from aggregator.errors import AggregatorError, CheckpointError, ConfigError, UpdateRejected
from aggregator.job_shard import JobShard
from aggregator.metrics import AggregatorMetrics
from aggregator.settings import AggregatorSettings
from aggregator.shard import Decoded, Outcome, PartitionState, decode_update
from schemas.errors import SchemaError
from schemas.messages import JobSpec, ShardUpdate, ShardVersion, decode, encode

log = logging.getLogger("fedfleet.aggregator")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: AggregatorWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker._on_assigned(list(assigned))


class AggregatorWorker:
    """One aggregator process: owns the shards Kafka assigns it.

    Use as ``async with AggregatorWorker(settings) as w: await w.run()``; ``start``/``stop``
    are idempotent. ``await w.drain()`` processes until every owned partition is caught up
    and idle (tests), ``w.request_stop()`` ends ``run`` gracefully.
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        *,
        store: CheckpointStore | None = None,
        metrics: AggregatorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store: CheckpointStore = store or FileCheckpointStore(settings.checkpoint_dir)
        self.metrics = metrics or AggregatorMetrics()
        self.jobs: dict[str, JobSpec] = {}
        self.set_aside: dict[str, str] = {}  # job_id -> why its records cannot be applied
        self.partitions: dict[int, PartitionState] = {}
        self._since_ckpt: dict[int, int] = {}
        self._last_record: dict[int, float] = {}  # partition -> monotonic time of last record
        self._last_ckpt = time.monotonic()
        self._lock = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None
        self._jobs_consumer: AIOKafkaConsumer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._jobs_tp = TopicPartition(settings.jobs_topic, 0)
        self.artifacts = ArtifactCache(settings.kafka_kwargs(), settings.artifacts_topic,
                                       client_id=settings.client_id)  # fmt: skip
        self._started = False
        self._closed = False
        self._stop = asyncio.Event()
        self._builds: list[asyncio.Future[ShardVersion]] = []
        # labelled counter per (shard, strategy): labels() costs more than the inc()
        self._applied_child: dict[tuple[int, str], Any] = {}
        self.assignments = 0  # number of completed assignment callbacks

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AggregatorWorker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if self._started and not self._closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    async def start(self) -> None:
        """Connect, wait for the topics, read the jobs topic, join the group (idempotent).

        Raises :class:`ConfigError` when the topics do not appear within
        ``settings.topic_wait_s``; clients opened so far are closed again.
        """
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self._close_clients()
            self._closed = True
            raise

    async def _wait_for_topics(self) -> None:
        assert self._jobs_consumer is not None
        s = self.settings
        wanted = {s.jobs_topic, s.updates_topic, s.models_topic}
        deadline = time.monotonic() + s.topic_wait_s
        while True:
            missing = wanted - set(await self._jobs_consumer.topics())
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise ConfigError(f"Kafka topics missing: {sorted(missing)}")
            await asyncio.sleep(0.5)

    async def _start(self) -> None:
        s = self.settings
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(s.metrics_port, registry=self.metrics.registry)
        self._producer = clients.models_producer(s)
        await self._producer.start()
        self._jobs_consumer = clients.jobs_consumer(s)
        await self._jobs_consumer.start()
        await self._wait_for_topics()
        self._jobs_consumer.assign([self._jobs_tp])
        await self._jobs_consumer.seek_to_beginning(self._jobs_tp)
        await self.catch_up_jobs()
        self._consumer = clients.updates_consumer(s)
        await self._consumer.start()
        self._consumer.subscribe([s.updates_topic], listener=_Listener(self))

    async def stop(self) -> None:
        """Checkpoint and commit what is owned, then close clients (idempotent)."""
        if not self._started or self._closed:
            return
        self._closed = True
        try:
            async with self._lock:
                with contextlib.suppress(KafkaError):
                    await self._publish_outboxes()
                    await self._mark_latest(force=True)
                offsets = await self._checkpoint(force=True)
                with contextlib.suppress(KafkaError):
                    await self._publish_outboxes()  # idle announcements, now checkpointed
            await self._commit(offsets)
        finally:
            await self._close_clients()

    async def _close_clients(self) -> None:
        for c in (self._consumer, self._jobs_consumer, self._producer):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.stop()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ inspection

    def job_shard(self, job_id: str, shard: int) -> JobShard | None:
        part = self.partitions.get(shard)
        return None if part is None else part.jobs.get(job_id)

    # ------------------------------------------------------------------ jobs

    async def catch_up_jobs(self) -> None:
        """Read ``{prefix}jobs`` up to its current end."""
        c = self._jobs_consumer
        assert c is not None
        end = (await c.end_offsets([self._jobs_tp]))[self._jobs_tp]
        while await c.position(self._jobs_tp) < end:
            batch = await c.getmany(self._jobs_tp, timeout_ms=500)
            for rec in batch.get(self._jobs_tp, []):
                await self._on_job_record(rec.value)

    async def _catch_up_jobs_until_read(self, max_delay_s: float = 10.0) -> None:
        """``catch_up_jobs``, retried while Kafka does not answer (a node cut off): a record
        naming a job not read yet is decided only once ``{prefix}jobs`` has been read, never
        as an unknown job because the read timed out."""
        delay = 0.5
        while True:
            try:
                await self.catch_up_jobs()
                return
            except KafkaError as exc:
                if self._stop.is_set():
                    raise
                self.metrics.errors.labels(kind="jobs").inc()
                log.warning("reading %s failed (%s); again in %.1f s",
                            self.settings.jobs_topic, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_delay_s)

    async def _poll_jobs(self) -> None:
        assert self._jobs_consumer is not None
        batch = await self._jobs_consumer.getmany(self._jobs_tp, timeout_ms=0)
        for rec in batch.get(self._jobs_tp, []):
            await self._on_job_record(rec.value)

    async def _on_job_record(self, value: bytes | None) -> None:
        if value is None:  # tombstone on the compacted topic
            return
        try:
            job = decode(value, JobSpec)
        except SchemaError as exc:
            log.warning("bad JobSpec on %s: %s", self.settings.jobs_topic, exc)
            self.metrics.rejected.labels(shard="", reason=f"job_{exc.reason}").inc()
            return
        if not await self._ensure_artifact(job):
            return
        self.jobs[job.job_id] = job
        for part in self.partitions.values():
            part.activate(job)

    def _job_of(self, job_id: str) -> JobSpec | None:
        if job_id in self.set_aside:
            raise UpdateRejected("artifact_missing", self.set_aside[job_id])
        return self.jobs.get(job_id)

    async def _ensure_artifact(self, job: JobSpec) -> bool:
        """An onnx job's artifact before its first update: its version 0 is the artifact's
        initializers. The coordinator writes it (acked) before the job, so a miss is Kafka
        being slow or, after ``artifact_wait_s`` of full reads without it, an artifact that
        is gone: the job is set aside and its records are rejected ``artifact_missing``
        (counted per shard; every shard reads the same topic) until the job is announced
        again. Kafka not answering is retried without a bound."""
        delay = 0.5
        deadline = time.monotonic() + self.settings.artifact_wait_s
        while True:
            try:
                await self.artifacts.ensure(job.spec)
                self.set_aside.pop(job.job_id, None)
                return True
            except (AggregatorError, KafkaError, OSError) as exc:
                self.metrics.errors.labels(kind="artifact").inc()
                gone = isinstance(exc, AggregatorError) and exc.code == "artifact_missing"
                if gone and time.monotonic() >= deadline:
                    self.metrics.errors.labels(kind="artifact_missing").inc()
                    log.error("job %s set aside: %s (its updates are rejected "
                              "artifact_missing)", job.job_id, exc)  # fmt: skip
                    self.set_aside[job.job_id] = str(exc)
                    return False
                log.warning("job %s: no artifact yet (%s); retrying in %.1fs", job.job_id,
                            exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ------------------------------------------------------------------ rebalance

    async def _on_revoked(self, tps: list[TopicPartition]) -> None:
        async with self._lock:
            mine = [tp.partition for tp in tps if tp.partition in self.partitions]
            with contextlib.suppress(KafkaError):
                await self._publish_outboxes()
            offsets = await self._checkpoint(force=True, only=mine)
            with contextlib.suppress(KafkaError):
                await self._publish_outboxes()  # held announcements a checkpoint released
            await self._commit(offsets)  # before the partitions move on
            for p in mine:
                self.partitions.pop(p, None)
                self._since_ckpt.pop(p, None)
                self._last_record.pop(p, None)

    async def _on_assigned(self, tps: list[TopicPartition]) -> None:
        async with self._lock:
            assert self._consumer is not None
            s = self.settings
            for tp in tps:
                part = PartitionState(
                    tp.topic,
                    tp.partition,
                    options=s.strategy_options(),
                    publish_every=s.publish_every,
                    dedupe_window=s.dedupe_window,
                    max_update_bytes=s.max_update_bytes,
                    models_zstd_level=s.models_zstd_level,
                    min_publish_interval_s=s.min_publish_interval_s,
                    load_blob=self.store.load,
                    seen_window_s=s.seen_window_s,
                    artifact_of=self.artifacts.artifact_of,
                )
                blob = await asyncio.to_thread(self.store.load, part.key)
                if blob is not None:
                    await asyncio.to_thread(part.restore, ck.loads(blob), self.store.load)
                self.partitions[tp.partition] = part
                self._since_ckpt[tp.partition] = 0
                self._consumer.seek(tp, part.next_offset)
                for job in self.jobs.values():
                    part.activate(job)
                log.info("assigned %s at offset %d", part.key, part.next_offset)
            with contextlib.suppress(KafkaError):
                await self._publish_outboxes()
            self.assignments += 1

    # ------------------------------------------------------------------ main loop

    async def run(self, *, burst: bool = False, idle_s: float = 0.5) -> None:
        """Consume until :meth:`request_stop` (or, with ``burst``, until caught up and idle)."""
        await self.start()
        assert self._consumer is not None
        idle_since: float | None = None
        while not self._stop.is_set():
            await self._poll_jobs()
            batch = await self._consumer.getmany(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_poll_records
            )
            if batch:
                idle_since = None
                await self._process(batch)
            else:
                async with self._lock:
                    offsets = await self._checkpoint(force=burst)
                await self._commit(offsets)
            await self.announce_idle()
            if not burst:
                continue
            if batch or not await self._caught_up():
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= idle_s:
                await self.announce_idle(force=True)  # drain ends with the latest announced
                return

    async def drain(self, idle_s: float = 0.5) -> None:
        """Process until every owned partition is caught up and idle for ``idle_s``."""
        await self.run(burst=True, idle_s=idle_s)

    async def announce_idle(self, *, force: bool = False) -> None:
        """Announce the newest version of caught-up partitions quiet for
        ``min_publish_interval_s`` (``force``: quiet or not); checkpoint, produce, commit.

        Disabled when ``min_publish_interval_s`` is 0 (the plain ``publish_every`` cadence).
        """
        async with self._lock:
            marked = await self._mark_latest(force=force)
            if not marked:
                return
            offsets = await self._checkpoint(force=True, only=marked)
            await self._publish_outboxes()
        await self._commit(offsets)

    async def _mark_latest(self, *, force: bool) -> list[int]:
        """Queue idle announcements (held until checkpointed); the partitions concerned."""
        interval = self.settings.min_publish_interval_s
        if interval <= 0.0 or self._consumer is None:
            return []
        now = time.monotonic()
        due = [
            p
            for p, part in self.partitions.items()
            if part.unannounced and (force or now - self._last_record.get(p, 0.0) >= interval)
        ]
        if not due:
            return []
        # only at the end of the log: a replay never re-decides what the original decided
        tps = [TopicPartition(self.settings.updates_topic, p) for p in due]
        try:
            ends = await self._consumer.end_offsets(tps)
        except KafkaError as exc:  # a leader cut off: not announced now, asked again later
            self.metrics.errors.labels(kind="end_offsets").inc()
            log.warning("end offsets of %s unknown (%s); idle announcement deferred",
                        [tp.partition for tp in tps], exc)  # fmt: skip
            return []
        return [
            tp.partition
            for tp in tps
            if self.partitions[tp.partition].next_offset >= ends[tp]
            and self.partitions[tp.partition].announce_latest()
        ]

    async def _caught_up(self) -> bool:
        assert self._consumer is not None
        if self.assignments == 0:
            return False
        tps = [TopicPartition(self.settings.updates_topic, p) for p in self.partitions]
        if not tps:
            return True
        ends = await self._consumer.end_offsets(tps)
        behind = False
        for tp in tps:
            part = self.partitions.get(tp.partition)
            if part is None:
                continue
            lag = max(0, ends[tp] - part.next_offset)
            self.metrics.lag.labels(partition=str(tp.partition)).set(lag)
            behind = behind or lag > 0
        return not behind

    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        async with self._lock:
            offsets = await self._process_locked(batch)
        await self._commit(offsets)

    async def _process_locked(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        for tp, records in batch.items():
            part = self.partitions.get(tp.partition)
            if part is None:
                continue
            await self._apply_records(part, records)
            self._since_ckpt[tp.partition] = self._since_ckpt.get(tp.partition, 0) + len(records)
            self._last_record[tp.partition] = time.monotonic()
            hw = self._consumer.highwater(tp) if self._consumer is not None else None
            if hw is not None:
                self.metrics.lag.labels(partition=str(tp.partition)).set(
                    max(0, hw - part.next_offset)
                )
        await self._publish_outboxes()
        return await self._checkpoint()

    async def _apply_records(self, part: PartitionState, records: list[Any]) -> int:
        """Fold one fetched batch of a partition in, in offset order; how many were new.

        Each record is handled synchronously (no task switch per record); the loop only
        awaits to catch up on ``{prefix}jobs`` when a record names a job not known yet.
        """
        handled = 0
        jobs, set_aside = self.jobs, self.set_aside
        for rec in records:
            offset = rec.offset
            if offset < part.next_offset:
                continue
            t0 = time.perf_counter()
            item = self._decode(part, rec.value or b"", offset)
            if type(item) is ShardUpdate and item.job_id not in jobs:
                if item.job_id not in set_aside:
                    await self._catch_up_jobs_until_read()
            self._apply(part, item, offset, t0)
            handled += 1
            if part.outbox:
                self._start_builds(part)
        return handled

    def _decode(self, part: PartitionState, raw: bytes, offset: int) -> ShardUpdate | Decoded:
        """The record's message (its payload is decoded by the partition, after the
        shard/job/bounds/dedupe checks), or its decode failure for ``handle`` to count."""
        try:
            return decode_update(raw, max_bytes=self.settings.max_update_bytes)
        except UpdateRejected as exc:
            return Decoded(None, error=exc)
        except Exception as exc:  # never crash on one record; handle() counts it
            log.exception("unexpected decode error on %s@%d", part.key, offset)
            return Decoded(None, error=UpdateRejected("internal", str(exc)))

    def _apply(
        self, part: PartitionState, item: ShardUpdate | Decoded, offset: int, t0: float
    ) -> Outcome:
        try:
            out = part.handle(item, offset, self._job_of)
        except Exception:  # never crash on one record; count and go on
            log.exception("unexpected error on %s@%d", part.key, offset)
            part.rejected["internal"] = part.rejected.get("internal", 0) + 1
            out = Outcome(offset, "rejected", "internal")
        m = self.metrics
        m.apply_seconds.observe(time.perf_counter() - t0)
        if out.status in ("applied", "buffered"):
            name = part.jobs[out.job_id].job.strategy.name
            child = self._applied_child.get((part.shard, name))
            if child is None:
                child = self._applied_child[part.shard, name] = m.applied.labels(
                    shard=str(part.shard), strategy=name
                )
            child.inc()
            if out.staleness is not None:
                m.staleness.observe(out.staleness)
        else:
            m.rejected.labels(shard=str(part.shard), reason=out.reason).inc()
            if out.reason != "duplicate":  # after the ack: lost on this shard
                log.warning("%s@%d: %s rejected: %s", part.key, offset, out.update_id, out.reason)
        return out

    def _start_builds(self, part: PartitionState) -> None:
        """Compress queued versions in worker threads while the loop keeps applying."""
        loop = asyncio.get_running_loop()
        while part.outbox:
            pv = part.outbox.pop(0)
            self._builds.append(loop.run_in_executor(None, pv.build))

    async def _publish_outboxes(self) -> None:
        """Announce every queued version, in order, and wait for Kafka's acks."""
        for part in self.partitions.values():
            self._start_builds(part)
        builds, self._builds = self._builds, []
        if self._producer is None:
            return
        futs: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        try:
            for b in builds:
                sv = await b
                key = f"{sv.job_id}:{sv.shard}".encode()
                futs.append(await self._producer.send(self.settings.models_topic, encode(sv),
                                                      key=key))  # fmt: skip
        except KafkaError as exc:  # no metadata for the topic in time: not even queued
            error = exc
        done = 0
        for r in await asyncio.gather(*futs, return_exceptions=True):  # every outcome read
            if isinstance(r, BaseException):
                error = error or r
                break
            done += 1
            self.metrics.published.inc()
        if error is not None:
            if not isinstance(error, KafkaError):
                raise error
            # Kafka did not take them (a leader cut off, a timeout): keep every
            # announcement not acknowledged, in order, ahead of newer ones, and send them
            # again on the next round (a version announced twice is applied once)
            self._builds = builds[done:] + self._builds
            self.metrics.errors.labels(kind="publish").inc()
            log.warning("announcing %d version(s) failed, will retry: %s: %s",
                        len(builds) - done, type(error).__name__, error)  # fmt: skip

    async def _checkpoint(
        self, *, force: bool = False, only: list[int] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Write due checkpoints (all dirty ones when ``force``); return offsets to commit."""
        s = self.settings
        due_time = time.monotonic() - self._last_ckpt >= s.checkpoint_interval_s
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for p, part in self.partitions.items():
            if only is not None and p not in only:
                continue
            if not part.dirty:
                continue
            if not (force or due_time or self._since_ckpt.get(p, 0) >= s.checkpoint_every):
                continue
            t0 = time.perf_counter()
            ckpt, blobs, obsolete = part.checkpoint()
            try:
                await asyncio.to_thread(self._write, part.key, ck.dumps(ckpt), blobs, obsolete)
            except CheckpointError:
                part.forget_saved_blobs()
                log.exception("checkpoint of %s failed; offsets not committed", part.key)
                continue
            part.saved()
            part.dirty = False
            part.release_held()  # idle announcements are durable now
            self._since_ckpt[p] = 0
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
            offsets[TopicPartition(part.topic, p)] = OffsetAndMetadata(part.next_offset, "")
        if due_time or force:
            self._last_ckpt = time.monotonic()
        return offsets

    def _write(self, key: str, data: bytes, blobs: dict[str, bytes], obsolete: list[str]) -> None:
        for k, b in blobs.items():
            self.store.save(k, b)
        self.store.save(key, data)
        for k in obsolete:
            self.store.delete(k)

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit offsets already covered by a written checkpoint (best effort)."""
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:  # the checkpoint is authoritative
            log.info("offset commit skipped: %s", exc)
