"""The coordinator's parts, wired but not running: stores, registry, selector, uploads,
reports (federated evaluation and statistics).

``build_core`` is the one place that wires them; ``Coordinator`` (``coordinator.service``)
adds the I/O shell around it (Redis and Kafka clients, the fleet link, the loops, REST).
Tests and benchmarks that drive one part by hand build a core over their own Redis client
and in-memory adapters (``MemoryFleetLink``, ``DirectTaskSink``, a fake producer) instead
of starting a whole service and switching its loops off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator.aborts import AbortHandler, FailJob
from coordinator.artifacts import ArtifactStore, MemoryArtifacts
from coordinator.broker_admin import BrokerAdmin
from coordinator.cred_journal import CredentialJournal
from coordinator.dispatcher import Publish
from coordinator.enrolment import Enroller, EnrolmentStore
from coordinator.errors import CoordinatorError, NotFound
from coordinator.evalstore import EvalStore
from coordinator.fleet import FleetStore
from coordinator.ingest import Router, TelemetryBatcher
from coordinator.jobs import Job, JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.keys import Keys
from coordinator.lock import RedisLock
from coordinator.metrics import CoordinatorMetrics
from coordinator.ratelimit import DeviceLimits
from coordinator.registry import ModelRegistry
from coordinator.reports import ReportHandler
from coordinator.rounds import RoundStore
from coordinator.selector import Selector
from coordinator.settings import CoordinatorSettings
from coordinator.sidetasks import SideTasks, WriteSpec
from coordinator.signing import Signer
from coordinator.task_sink import TaskSink
from coordinator.tasks import TaskStore, deployment_tag, load_task_key
from coordinator.uploads import ShardProducer, UploadHandler
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, JobSpec, ShardVersion, decode

log = logging.getLogger(__name__)


async def shard_versions(registry: ModelRegistry, job: Job | JobSpec) -> list[int] | None:
    """The newest version of each shard of ``job`` known to any coordinator: what this
    process assembled, or newer from the shared model directory (another process may own
    the ``fl.models`` consumer group). The selector asks it (has the model moved since the
    round opened?) and so do uploads (is a base too stale?)."""
    spec = job.spec if isinstance(job, Job) else job
    got = registry.newest_shard_versions(spec, io=False)  # the per-upload path: no thread
    if got is not None:
        return got
    return await asyncio.to_thread(registry.newest_shard_versions, spec)


@dataclass
class CoordinatorCore:
    settings: CoordinatorSettings
    metrics: CoordinatorMetrics
    signer: Signer
    registry: ModelRegistry
    fleet: FleetStore
    tasks: TaskStore
    jobs: JobStore
    stats: JobStatsStore
    rounds: RoundStore
    batcher: TelemetryBatcher
    selector: Selector
    uploads: UploadHandler
    router: Router
    evals: EvalStore
    side: SideTasks
    artifacts: ArtifactStore
    enroller: Enroller

    async def shard_versions(self, job: Job | JobSpec) -> list[int] | None:
        return await shard_versions(self.registry, job)

    async def apply_shard_version(self, value: bytes) -> int | None:
        """Fold one ``fl.models`` record in; returns the new global version, if any."""
        try:
            sv = decode(value, ShardVersion, max_bytes=UPDATE_MAX_BYTES)
            job = await self.jobs.get(sv.job_id)
            m = await asyncio.to_thread(self.registry.apply, job.spec, sv)
            shards = len(job.spec.shard_bounds) - 1
        except SchemaError as exc:
            self.metrics.rejected.labels(source="fl.models", reason=exc.reason).inc()
            return None
        except NotFound:
            self.metrics.rejected.labels(source="fl.models", reason="unknown_job").inc()
            return None
        except CoordinatorError as exc:
            self.metrics.rejected.labels(source="fl.models", reason=exc.code).inc()
            return None
        # per-shard figures (shard.{s}.*) and the job's updates_applied / mean staleness
        await self.stats.record_shard(sv, shards)
        if m is None:
            return None
        self.metrics.versions.inc()
        try:  # a version worth evaluating opens its evaluation (the selector asks devices)
            await self.side.on_version(job, m.version, m.shard_versions, time.time())
        except Exception:
            self.metrics.errors.labels(loop="evaluation").inc()
            log.warning("could not open the evaluation of %s v%d", sv.job_id, m.version,
                        exc_info=True)  # fmt: skip
        self.selector.wake(sv.job_id)  # a sync round may be waiting for this version
        return m.version


def build_core(
    s: CoordinatorSettings,
    redis: Any,
    *,
    metrics: CoordinatorMetrics,
    producer: ShardProducer,
    task_sink: TaskSink,
    publish: Publish,
    fail_job: FailJob | None = None,
    complete_job: Callable[[Job, str], Awaitable[None]] | None = None,
    write_spec: WriteSpec | None = None,
    artifacts: ArtifactStore | None = None,
    broker_admin: BrokerAdmin | None = None,
    task_key: bytes | None = None,
    credentials: CredentialJournal | None = None,
) -> CoordinatorCore:
    """Wire every part over ``redis`` (a ``decode_responses=True`` client the caller owns).
    ``producer`` takes accepted uploads (``fl.updates``), ``task_sink`` leased tasks;
    ``publish`` reaches devices; ``fail_job(job_id, reason)`` ends a job whose tasks all
    abort for one data reason (``coordinator.aborts``) or whose statistics phase found labels
    outside its classes; ``complete_job(job, reason)`` ends one whose stop condition held;
    ``write_spec(job_id, model_spec)`` records a standardize job's fixed input
    standardisation (``coordinator.lifecycle.set_spec``); ``artifacts`` holds onnx jobs'
    model artifacts (default: in memory); ``broker_admin`` the broker's credential store
    enrolment writes to (None: the broker has none, enrolment answers 503); ``task_key``
    the key upload tokens are derived with (None: ``load_task_key(s.task_key_path)``);
    ``credentials`` the durable record of enrolments (None: Redis only)."""
    signer = Signer.load_or_create(s.signing_key_path)
    task_key = task_key if task_key is not None else load_task_key(s.task_key_path)
    artifacts = artifacts if artifacts is not None else MemoryArtifacts()
    registry = ModelRegistry(s.model_store_dir, signer, retention=s.retention,
                             artifacts=artifacts)  # fmt: skip
    fleet = FleetStore(redis, s.key_prefix, s.telemetry_ttl_s, device_ttl_s=s.device_ttl_s)
    tasks = TaskStore(redis, s.key_prefix, keep_s=s.task_record_ttl_s)
    jobs = JobStore(redis, s.key_prefix)
    stats = JobStatsStore(redis, s.key_prefix)
    rounds = RoundStore(redis, s.key_prefix)
    enrolment = EnrolmentStore(redis, s.key_prefix)
    enroller = Enroller(enrolment, broker_admin, fleet, metrics, probation_s=s.probation_s,
                        journal=credentials)  # fmt: skip
    batcher = TelemetryBatcher(
        fleet, metrics, batch=s.telemetry_batch, interval_s=s.telemetry_flush_s,
        admit=enrolment.enrolled if s.require_enrolment else None,
    )  # fmt: skip

    async def versions(job: Job | JobSpec) -> list[int] | None:
        return await shard_versions(registry, job)

    async def republish(spec: JobSpec) -> None:
        await asyncio.to_thread(registry.republish, spec)

    async def final_version(job: Job) -> int | None:
        """A completed job's pinned version (None: the pin is not this job's)."""
        name = job.spec.model_name

        def pinned() -> int | None:
            v = registry.pinned(name)
            if v is None:
                return None
            try:
                ours = registry.manifest(name, v).job_id == job.spec.job_id
            except NotFound:
                return None
            return v if ours else None

        return await asyncio.to_thread(pinned)

    evals = EvalStore(redis, s.key_prefix)
    side = SideTasks(
        settings=s, fleet=fleet, tasks=tasks, evals=evals, stats=stats, task_sink=task_sink,
        task_key=task_key,
        metrics=metrics, write_spec=write_spec, republish=republish, fail_job=fail_job,
        final_version=final_version,
    )  # fmt: skip
    selector = Selector(
        settings=s, fleet=fleet, tasks=tasks, jobs=jobs, rounds=rounds, stats=stats,
        lock=RedisLock(redis, Keys(s.key_prefix).selector_lock), task_sink=task_sink,
        task_key=task_key,
        publish=publish, metrics=metrics, latest_versions=versions, on_complete=complete_job,
        side=side,
    )  # fmt: skip
    uploads = UploadHandler(
        tasks=tasks, jobs=jobs, fleet=fleet, stats=stats, producer=producer,
        updates_topic=s.updates_topic, publish=publish, metrics=metrics,
        on_uploaded=selector.wake, newest_versions=versions,
        deployment=deployment_tag(s.topic_prefix),
    )  # fmt: skip
    aborts = AbortHandler(fleet=fleet, stats=stats, metrics=metrics, hold_s=s.data_hold_s,
                          fail_after=s.fail_after_aborts, fail_job=fail_job)  # fmt: skip
    reports = ReportHandler(tasks=tasks, jobs=jobs, fleet=fleet, stats=stats, evals=evals,
                            metrics=metrics, on_report=selector.wake)  # fmt: skip
    router = Router(fleet=fleet, tasks=tasks, stats=stats, uploads=uploads, batcher=batcher,
                    metrics=metrics, aborts=aborts, reports=reports,
                    limits=DeviceLimits.from_settings(s), max_ahead_s=s.telemetry_max_ahead_s,
                    max_behind_s=s.telemetry_max_behind_s)  # fmt: skip
    return CoordinatorCore(
        settings=s, metrics=metrics, signer=signer, registry=registry, fleet=fleet,
        tasks=tasks, jobs=jobs, stats=stats, rounds=rounds, batcher=batcher,
        selector=selector, uploads=uploads, router=router, evals=evals, side=side,
        artifacts=artifacts, enroller=enroller,
    )  # fmt: skip
