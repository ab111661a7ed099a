"""Job changes, made durable in one order: the journal (what recovery rebuilds from), then
Redis, then ``fl.jobs`` (what the aggregators read). ``set_status`` ends a job;
``set_spec`` fixes its model spec (a ``standardize`` job's input standardisation), each
as a new journal revision."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from coordinator.jobs import Job, JobStore
from coordinator.journal import JobJournal
from schemas.messages import JobSpec, ModelSpecMsg

PublishJob = Callable[[JobSpec], Awaitable[None]]


async def _write(job: Job, spec: JobSpec, *, journal: JobJournal, jobs: JobStore,
                 publish_job: PublishJob) -> Job:  # fmt: skip
    new = Job(spec, job.eligibility, job.selection, job.stop)
    rev = await journal.append(new)
    await jobs.put(new, revision=rev)
    await publish_job(spec)
    return new


async def set_status(
    job_id: str, status: str, reason: str, *, journal: JobJournal, jobs: JobStore,
    publish_job: PublishJob,
) -> Job:  # fmt: skip
    """Record ``job_id`` as ``status`` (with ``reason``); returns the new job. Raises what
    the journal or Kafka raise (the caller answers 503 or retries)."""
    job = await jobs.get(job_id)
    spec = msgspec.structs.replace(job.spec, status=status, status_reason=reason[:200])
    return await _write(job, spec, journal=journal, jobs=jobs, publish_job=publish_job)


async def set_spec(
    job_id: str, model: ModelSpecMsg, *, journal: JobJournal, jobs: JobStore,
    publish_job: PublishJob,
) -> Job:  # fmt: skip
    """Record ``job_id`` with model spec ``model`` (same layout: the aggregators keep their
    shard state, they key it by job id); returns the new job."""
    job = await jobs.get(job_id)
    spec = msgspec.structs.replace(job.spec, spec=model)
    return await _write(job, spec, journal=journal, jobs=jobs, publish_job=publish_job)
