"""The job journal (Kafka and in-memory, one contract) and recovery of jobs a Redis lost
or rolled back."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from coordinator.jobs import Job, JobStore, build_job
from coordinator.journal import (
    KafkaJobJournal,
    MemoryJobJournal,
    journal_unrecorded_jobs,
    restore_lost_jobs,
)
from coordinator.metrics import CoordinatorMetrics, counter_value
from tests import journal_rig as rig

pytestmark = pytest.mark.integration



def a_job(jid: str, **over: Any) -> Job:
    body = {"job_id": jid, "model_name": f"m-{jid}", "concurrency": 3,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
            "eligibility": {"min_battery": 35.0}, "selection": {"mode": "async"},
            **over}  # fmt: skip
    return build_job(body)


def journals(kind: str, stack: Any, prefix: str) -> Any:
    return rig.journals(kind, stack, prefix, memory=MemoryJobJournal, kafka=KafkaJobJournal)


@pytest.fixture(params=["kafka", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_journal_keeps_the_newest_revision_of_every_job_across_restarts(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    async with journals(kind, stack, unique_prefix) as opener:
        async with opener() as j:
            assert j.latest() == {}
            a, b = a_job("ja"), a_job("jb")
            r1 = await j.append(a)
            await j.append(b)
            stopped = Job(msgspec.structs.replace(a.spec, status="stopped"), a.eligibility,
                          a.selection)  # fmt: skip
            r2 = await j.append(stopped)
            assert r2 > r1
            assert j.latest()["ja"] == (r2, stopped)  # own writes are visible at once
        async with opener() as j2:  # a restarted coordinator reads it all back
            got = j2.latest()
            assert set(got) == {"ja", "jb"}
            assert got["ja"] == (r2, stopped) and got["jb"][1] == b
            assert got["jb"][1].eligibility.min_battery == 35.0


async def test_lost_and_rolled_back_jobs_are_restored_and_counted(
    stack: Any, unique_prefix: str
) -> None:
    r: Any = Redis.from_url(stack.redis_url, decode_responses=True)
    prefix = f"ff:{unique_prefix}"
    jobs = JobStore(r, prefix)
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    j = MemoryJobJournal()
    try:
        legacy = a_job("old")  # in Redis from before the journal existed
        await jobs.put(legacy)
        assert await journal_unrecorded_jobs(j, jobs) == ["old"]
        assert set(j.latest()) == {"old"}
        a = a_job("a")
        rev = await j.append(a)
        await jobs.put(a, revision=rev)
        assert await restore_lost_jobs(j, jobs, metrics) == []  # Redis agrees
        # Redis loses everything: both come back, with their eligibility and selection
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        assert sorted(await restore_lost_jobs(j, jobs, metrics)) == ["a", "old"]
        back = await jobs.get("a")
        assert back == a and (await jobs.revisions(["a"]))["a"] == rev
        assert counter_value(metrics.jobs_restored) == 2
        # a rollback: Redis holds the job as running, the journal has it stopped since
        stopped = Job(msgspec.structs.replace(a.spec, status="stopped"), a.eligibility,
                      a.selection)  # fmt: skip
        await j.append(stopped)
        assert await restore_lost_jobs(j, jobs, metrics) == ["a"]
        assert (await jobs.get("a")).spec.status == "stopped"
        assert await restore_lost_jobs(j, jobs, metrics) == []
    finally:
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        await r.aclose()
