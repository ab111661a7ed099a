"""What happens to a job's evaluation work once it ends: a completed job's final (pinned)
version is evaluated on ``evaluation.final_devices`` devices, each once; a stopped job's
open evaluations close and its evaluation tasks expire (devices freed); evaluation tasks
do not count toward a device's ``daily_cap``. Real Redis, the rig of ``test_fed_eval``."""

from __future__ import annotations

import time

import httpx

from coordinator.lifecycle import set_status
from tests.test_fed_eval import Rig, rig
from tests.test_fed_eval import redis_url as redis_url

__all__ = ["redis_url", "rig"]  # fixtures


async def _complete_by_updates(rig: Rig, **evaluation: object) -> str:
    job = await rig.job(
        concurrency=1, stop={"max_updates": 1},
        evaluation={"devices": 2, "min_reports": 2, "every_versions": 100, **evaluation},
    )  # fmt: skip
    for shard in (0, 1):
        await rig.version(job, shard, 1)  # one update applied on every shard
    await rig.core.selector.select_once()  # the stop condition holds: completed, pinned
    assert rig.completed and (await rig.core.jobs.get(job.spec.job_id)).spec.status == "completed"
    return job.spec.job_id


async def test_the_final_version_is_scored_by_final_devices_each_once(rig: Rig) -> None:
    await rig.devices(8)
    jid = await _complete_by_updates(rig, final_devices=5)
    pinned = rig.core.registry.pinned("m")
    n = len(rig.sink.tasks)
    await rig.core.selector.select_once()
    fin = rig.sink.tasks[n:]
    assert {t.task_kind for t in fin} == {"eval"} and {t.model_version for t in fin} == {pinned}
    # the evaluation of version 1 that was open when the job ended: closed, its tasks gone
    older = [e for e in await rig.core.evals.evaluations(jid) if not e.final]
    assert all(e.closed_ts is not None for e in older)
    free = sum(1 for t in fin if t.device_id not in {x.device_id for x in rig.sink.tasks[:n]})
    assert len(fin) == 5 and free >= 1
    for t in fin[:4]:
        await rig.report(t)
    await rig.core.selector.select_once()
    assert len(rig.sink.tasks) == n + 5  # four reported, one still out: nobody new asked
    await rig.report(fin[4])  # the fifth: the final evaluation closes on count
    (ev,) = [e for e in await rig.core.evals.evaluations(jid) if e.final]
    assert ev.complete and ev.reports == 5 and ev.version == pinned and ev.examples == 50
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rig.app()),
                                 base_url="http://t") as http:  # fmt: skip
        j = (await http.get(f"/v1/jobs/{jid}")).json()
        m = (await http.get(f"/v1/jobs/{jid}/metrics")).json()
    assert j["final_evaluation"] == m["final"] and m["final"]["final"] is True
    assert m["final"]["version"] == pinned and m["final"]["reports"] == 5
    await rig.core.selector.select_once()
    assert await rig.core.jobs.ending() == [] and len(rig.sink.tasks) == n + 5


async def test_a_final_evaluation_closes_once_nobody_is_left_to_ask(rig: Rig) -> None:
    await rig.devices(3)
    jid = await _complete_by_updates(rig, final_devices=50)
    now = time.time()
    n = len(rig.sink.tasks)
    await rig.core.selector.select_once(now)
    fin = rig.sink.tasks[n:]
    assert 1 <= len(fin) <= 3
    for t in fin:
        await rig.report(t)
    await rig.core.selector.select_once(now + 1)  # within the grace: stays open
    (ev,) = [e for e in await rig.core.evals.evaluations(jid) if e.final]
    assert ev.closed_ts is None
    await rig.core.selector.select_once(now + rig.s.final_grace_s + 1)
    (ev,) = [e for e in await rig.core.evals.evaluations(jid) if e.final]
    assert ev.closed_ts is not None and ev.complete == (ev.reports >= 2)


async def test_a_stopped_job_closes_its_evaluations_and_frees_its_devices(rig: Rig) -> None:
    await rig.devices(4)
    job = await rig.job(concurrency=1, evaluation={"devices": 3, "min_reports": 3})
    jid = job.spec.job_id
    await rig.version(job, 0, 1)
    await rig.core.selector.select_once()
    evals = rig.sink.of("eval")
    assert len(evals) == 3
    await set_status(jid, "stopped", "stopped by request", journal=rig.journal,
                     jobs=rig.core.jobs, publish_job=lambda s: _noop())  # fmt: skip
    assert await rig.core.jobs.ending() == [jid]
    n = len(rig.sink.tasks)
    await rig.core.selector.select_once()
    assert len(rig.sink.tasks) == n  # no final evaluation for a stopped job
    (ev,) = await rig.core.evals.evaluations(jid)
    assert ev.closed_ts is not None and not ev.complete
    for t in evals:
        rec = await rig.core.tasks.get(t.task_id)
        assert rec is not None and rec.state == "expired"
    views = {v.device_id: v for v in await rig.core.fleet.live_views()}
    assert all(views[t.device_id].current_task == "" for t in evals)
    assert await rig.core.stats.get(jid, "tasks_eval_expired") == 3
    assert await rig.core.jobs.ending() == []


async def _noop() -> None:
    return None


async def test_evaluation_tasks_do_not_count_toward_the_daily_cap(rig: Rig) -> None:
    await rig.devices(1)
    job = await rig.job(concurrency=1, eligibility={"daily_cap": 1},
                        evaluation={"devices": 1, "min_reports": 1})  # fmt: skip
    await rig.version(job, 0, 1)
    await rig.core.selector.select_once()
    (t,) = rig.sink.tasks
    assert t.task_kind == "eval"
    await rig.report(t)
    await rig.core.selector.select_once()
    assert [x.task_kind for x in rig.sink.tasks] == ["eval", "train"]  # still under its cap
    (v,) = await rig.core.fleet.live_views()
    assert v.tasks_today == 1


async def test_an_ended_job_can_be_given_a_final_evaluation_over_rest(rig: Rig) -> None:
    await rig.devices(4)
    job = await rig.job(concurrency=1, evaluation={"devices": 1, "min_reports": 1,
                                                   "every_versions": 100})  # fmt: skip
    jid = job.spec.job_id
    await rig.version(job, 0, 1)
    await rig.version(job, 1, 1)  # newest version: 2
    admin = {"Authorization": "Bearer secret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rig.app()),
                                 base_url="http://t") as http:  # fmt: skip
        r = await http.post(f"/v1/jobs/{jid}/evaluate", json={}, headers=admin)
        assert r.status_code == 409 and "running" in r.json()["detail"]
        await set_status(jid, "stopped", "by hand", journal=rig.journal, jobs=rig.core.jobs,
                         publish_job=lambda s: _noop())  # fmt: skip
        await rig.core.selector.select_once()  # the sweep: the open evaluation of v1 closes
        assert (await http.post(f"/v1/jobs/{jid}/evaluate", json={})).status_code == 401
        r = await http.post(f"/v1/jobs/{jid}/evaluate", json={"version": 99}, headers=admin)
        assert r.status_code == 422
        r = await http.post(f"/v1/jobs/{jid}/evaluate", json={"devices": 3}, headers=admin)
        assert r.status_code == 202, r.text
        assert r.json()["final"]["version"] == 2 and r.json()["final"]["reports"] == 0
        r = await http.post(f"/v1/jobs/{jid}/evaluate", json={}, headers=admin)
        assert r.status_code == 409
        n = len(rig.sink.tasks)
        await rig.core.selector.select_once()
        fin = rig.sink.tasks[n:]
        assert len(fin) == 3 and {(t.task_kind, t.model_version) for t in fin} == {("eval", 2)}
        for t in fin:
            await rig.report(t)
        m = (await http.get(f"/v1/jobs/{jid}/metrics")).json()
    assert m["final"]["complete"] and m["final"]["reports"] == 3 and m["final"]["version"] == 2
