"""The job journal: the durable record of every job, so a coordinator recovers from a
Redis it finds empty or rolled back.

Redis holds the working copy of a job (``JobStore``); the journal holds every version of
it that was ever acknowledged to a user (create, stop), each with a ``revision``. It is a
port with two adapters held to one contract (``tests/test_journal.py``):

- ``KafkaJobJournal``: the compacted topic ``{topic_prefix}jobjournal`` keyed by job id
  (acks=all), read to its end at start and tailed by every coordinator;
- ``MemoryJobJournal``: a list shared by instances, for tests.

``restore_lost_jobs`` compares the two: a job the journal knows and Redis lacks (or holds
at an older revision) is written back, counted (``fedfleet_coord_jobs_restored_total``)
and logged. ``fl.jobs`` stays what the aggregators read (``JobSpec`` only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from coordinator.compacted import CompactedTopic, MemoryLog, OnTopic, next_revision
from coordinator.jobs import Job, JobStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import EligibilityPolicy, SelectionConfig, StopConfig
from coordinator.settings import CoordinatorSettings
from schemas.errors import FedfleetError
from schemas.messages import JobSpec

log = logging.getLogger(__name__)

class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    spec: JobSpec
    eligibility: dict[str, Any]
    selection: dict[str, Any]
    revision: int
    stop: dict[str, Any] = {}


def encode_record(job: Job, revision: int) -> bytes:
    return msgspec.json.encode(
        JobRecord(spec=job.spec, eligibility=job.eligibility.to_dict(),
                  selection=job.selection.to_dict(), stop=job.stop.to_dict(),
                  revision=revision)
    )  # fmt: skip


def decode_record(value: bytes) -> tuple[int, Job]:
    r = msgspec.json.decode(value, type=JobRecord)
    job = Job(r.spec, EligibilityPolicy.from_dict(r.eligibility),
              SelectionConfig.from_dict(r.selection), StopConfig.from_dict(r.stop))  # fmt: skip
    return r.revision, job


class JobJournal(Protocol):
    async def append(self, job: Job) -> int:
        """Record ``job`` durably; returns its revision (greater than any before it)."""
        ...

    def latest(self) -> dict[str, tuple[int, Job]]:
        """The newest revision of every job read so far."""
        ...


class _Index:
    def __init__(self) -> None:
        self.jobs: dict[str, tuple[int, Job]] = {}
        self.bad = 0

    def fold(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            rev, job = decode_record(value)
        except (msgspec.DecodeError, msgspec.ValidationError, FedfleetError, ValueError):
            self.bad += 1  # a record this version cannot read: skipped, counted
            return
        cur = self.jobs.get(job.spec.job_id)
        if cur is None or rev >= cur[0]:
            self.jobs[job.spec.job_id] = (rev, job)

    def next_revision(self, job_id: str) -> int:
        cur = self.jobs.get(job_id)
        return next_revision(cur[0] if cur else None)


class MemoryJobJournal:
    """In-process journal; instances built over the same ``log`` list see each other."""

    def __init__(self, log: list[bytes] | None = None) -> None:
        self._index = _Index()
        self._log = MemoryLog(log, self._index.fold)
        self.log = self._log.log

    async def append(self, job: Job) -> int:
        self._log.catch_up()
        rev = self._index.next_revision(job.spec.job_id)
        self._log.put(encode_record(job, rev))
        return rev

    def latest(self) -> dict[str, tuple[int, Job]]:
        self._log.catch_up()
        return dict(self._index.jobs)


class KafkaJobJournal(OnTopic):
    """The journal on its compacted topic (``coordinator.compacted``): ``start`` reads it to
    its end, ``run`` tails it."""

    def __init__(self, s: CoordinatorSettings, producer: Any) -> None:
        self.s = s
        self._index = _Index()
        self.log = CompactedTopic(s, producer, s.journal_topic, self._index.fold,
                                  name="journal")  # fmt: skip
        self.topic = self.log.topic

    async def append(self, job: Job) -> int:
        rev = self._index.next_revision(job.spec.job_id)
        await self.log.put(job.spec.job_id, encode_record(job, rev))
        return rev

    def latest(self) -> dict[str, tuple[int, Job]]:
        return dict(self._index.jobs)


async def restore_lost_jobs(
    journal: JobJournal, jobs: JobStore, metrics: CoordinatorMetrics
) -> list[str]:
    """Write back every job Redis lacks or holds at an older revision; returns their ids."""
    latest = journal.latest()
    if not latest:
        return []
    have = await jobs.revisions(list(latest))
    restored = []
    for jid, (rev, job) in latest.items():
        if have.get(jid, -1) < rev:
            await jobs.put(job, revision=rev)
            restored.append(jid)
    if restored:
        metrics.jobs_restored.inc(len(restored))
        log.warning("restored %d job(s) from the journal (Redis lacked them or held an "
                    "older revision): %s", len(restored), ", ".join(sorted(restored)))  # fmt: skip
    return restored


async def journal_unrecorded_jobs(journal: JobJournal, jobs: JobStore) -> list[str]:
    """Jobs Redis holds that the journal does not (created before it existed): record them."""
    known = journal.latest()
    added = []
    for jid in await jobs.ids():
        if jid in known:
            continue
        try:
            job = await jobs.get(jid)
        except FedfleetError:
            continue
        rev = await journal.append(job)
        await jobs.put(job, revision=rev)
        added.append(jid)
    return added


async def run_recovery(steps: list[Callable[[], Awaitable[Any]]], every_s: float) -> None:
    """Every ``every_s``: each restore step in turn (jobs, credentials)."""
    while True:
        for step in steps:
            await step()
        await asyncio.sleep(every_s)
