"""Evaluation and statistics tasks: the selector's pass for them, per running job.

``SideTasks.run(job, now, taken)`` runs before a job's training selection:

* it expires ``eval``/``stats`` tasks past their deadline, or whose evaluation closed
  (device released, ``tasks_<kind>_expired``);
* a ``standardize`` job without its input standardisation is in the **statistics phase**
  (``standardize.job_phase``): up to ``concurrency`` eligible devices that have not
  reported yet get a ``stats`` task; once ``standardize.ready``, the labels are checked
  (a label outside the job's classes fails the job) and the mean/std written into the job
  spec (``write_spec``: journal -> Redis -> ``fl.jobs``) after a model version carrying
  it was published (``republish``). ``run`` returns False: no training this pass;
* otherwise each open evaluation (opened by ``on_version`` when the registry published a
  version worth evaluating) asks up to ``evaluation.devices`` eligible idle devices, and
  closes at ``evaluation.timeout_s`` with what it has. Returns True: the job trains.

``SideTasks.after_end(job, now, taken)`` sweeps an ended job (``JobStore.ending``): its
open evaluations close and its side tasks expire; a ``completed`` job's final (pinned)
version is evaluated first, on up to ``evaluation.final_devices`` devices, each asked once
(``final_need``); it closes once that many reported, at ``timeout_s``, or once nothing is
out and no eligible device is left (not before ``final_grace_s``).

Side tasks lease in ``{p}{t}sideleases:{job}``: they take no training slot, but the device is
busy (``FleetStore.assign_task``) until it reports, declines, aborts or the task expires.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from coordinator.evalstore import EvalStore
from coordinator.evaluation import (
    Evaluation,
    complete_accuracies,
    final_need,
    final_of,
    final_wanted,
    should_open,
    timed_out,
    wanted,
)
from coordinator.fleet import FleetStore
from coordinator.issuing import issue_task
from coordinator.jobs import Job
from coordinator.jobstats import JobStatsStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import acceptor, select
from coordinator.settings import CoordinatorSettings
from coordinator.standardize import job_phase, label_problem, ready, standardized_spec
from coordinator.task_sink import TaskSink
from coordinator.tasks import TaskRecord, TaskStore, deployment_tag, new_task_id
from schemas.messages import JobSpec, ModelSpecMsg, Task

log = logging.getLogger(__name__)

OPEN_WINDOW = 8  # evaluations read per pass to find the open ones (older ones timed out)
WriteSpec = Callable[[str, ModelSpecMsg], Awaitable[None]]
Republish = Callable[[JobSpec], Awaitable[None]]
FailJob = Callable[[str, str], Awaitable[None]]
FinalVersion = Callable[[Job], Awaitable[int | None]]


def set_fed_gauges(metrics: CoordinatorMetrics, job_id: str, ev: Evaluation | None) -> None:
    if ev is not None and ev.complete and ev.accuracy is not None and ev.loss is not None:
        metrics.fed_accuracy.labels(job=job_id).set(ev.accuracy)
        metrics.fed_loss.labels(job=job_id).set(ev.loss)


class SideTasks:
    def __init__(
        self, *, settings: CoordinatorSettings, fleet: FleetStore, tasks: TaskStore,
        evals: EvalStore, stats: JobStatsStore, task_sink: TaskSink, task_key: bytes,
        metrics: CoordinatorMetrics, write_spec: WriteSpec | None = None,
        republish: Republish | None = None, fail_job: FailJob | None = None,
        final_version: FinalVersion | None = None,
    ) -> None:  # fmt: skip
        self.s = settings
        self.fleet = fleet
        self.tasks = tasks
        self.evals = evals
        self.stats = stats
        self.sink = task_sink
        self.task_key = task_key  # upload tokens are derived with it (coordinator.issuing)
        self.metrics = metrics
        self.write_spec = write_spec
        self.republish = republish
        self.fail_job = fail_job
        self.final_version = final_version  # a completed job's pinned version

    # ------------------------------------------------------------------ hooks
    async def on_version(self, job: Job, version: int, shard_versions: Sequence[int],
                         now: float) -> bool:  # fmt: skip
        """The registry published ``version`` of ``job``: open its evaluation if due."""
        spec = job.spec
        if job_phase(spec) != "training" or spec.evaluation.devices <= 0:
            return False
        last = await self.evals.last_version(spec.job_id)
        if not should_open(version, shard_versions, last, spec.evaluation.every_versions):
            return False
        return await self.evals.open(spec.job_id, version, now)

    async def accuracies(self, job: Job) -> list[float]:
        return complete_accuracies(await self.evals.evaluations(job.spec.job_id))

    async def after_end(self, job: Job, now: float, taken: set[str]) -> bool:
        """One sweep of an ended ``job``; True once nothing of it is left to do."""
        jid, cfg = job.spec.job_id, job.spec.evaluation
        evs = await self.evals.evaluations(jid, OPEN_WINDOW)
        fin = final_of(evs)
        if fin is None and job.spec.status == "completed" and cfg.devices > 0:
            v = None if self.final_version is None else await self.final_version(job)
            need = final_need(cfg.devices, cfg.final_devices, cfg.min_reports)
            if v is not None and await self.evals.open_final(jid, v, need, now):
                log.info("job %s: final evaluation of version %d on up to %d devices",
                         jid, v, need)  # fmt: skip
                evs = await self.evals.evaluations(jid, OPEN_WINDOW)
                fin = final_of(evs)
        live = fin if fin is not None and fin.closed_ts is None else None
        for ev in evs:
            if ev.closed_ts is None and ev is not live:
                await self._close(job, ev.version, now)
        outstanding = 0
        for task_id, deadline in await self.tasks.side_leased(jid):
            rec = await self.tasks.get(task_id)
            if rec is None:
                await self.tasks.drop_lease(jid, task_id, "eval")
            elif (live is not None and rec.kind == "eval" and rec.model_version == live.version
                  and deadline > now):  # fmt: skip
                outstanding += 1
                taken.add(rec.device_id)
            else:
                await self._expire(jid, task_id, now, "job_ended", rec)
        if live is None:
            return True
        if timed_out(live, cfg.timeout_s, now) or live.reports >= live.need:
            await self._close(job, live.version, now)
            return False  # the next sweep expires what is still out
        n = 0
        if want := final_wanted(live, outstanding):
            skip = await self.evals.reporters(jid, live.version)
            n = await self._ask(job, "eval", want, now, taken, version=live.version, skip=skip,
                                deadline=min(now + self.s.lease_s,
                                             live.opened_ts + cfg.timeout_s))  # fmt: skip
            if n:
                await self.evals.asked(jid, live.version, n)
        if not n and not outstanding and now - live.opened_ts >= self.s.final_grace_s:
            await self._close(job, live.version, now)  # nobody left to ask
        return False

    # ------------------------------------------------------------------ the pass
    async def run(self, job: Job, now: float, taken: set[str]) -> bool:
        """One pass for ``job``; False while it must not train (statistics phase)."""
        jid = job.spec.job_id
        phase = job_phase(job.spec)
        recent = await self.evals.evaluations(jid, OPEN_WINDOW) if phase == "training" else []
        open_versions = {ev.version for ev in recent if ev.closed_ts is None}
        outstanding = 0
        for task_id, deadline in await self.tasks.side_leased(jid):
            rec = await self.tasks.get(task_id)
            if rec is None:
                await self.tasks.drop_lease(jid, task_id, "eval")
            elif deadline <= now:
                await self._expire(jid, task_id, now, "deadline", rec)
            elif rec.kind == "eval" and rec.model_version not in open_versions:
                await self._expire(jid, task_id, now, "eval_closed", rec)
            elif rec.kind == "stats" and phase != "statistics":
                await self._expire(jid, task_id, now, "phase_over", rec)
            else:
                outstanding += 1
                taken.add(rec.device_id)
        if phase == "statistics":
            await self._statistics(job, now, taken, outstanding)
            return False
        cfg = job.spec.evaluation
        for ev in recent:
            if ev.closed_ts is not None:
                continue
            if timed_out(ev, cfg.timeout_s, now):
                await self._close(job, ev.version, now)
                continue
            need = wanted(ev, cfg.devices)
            if need:
                n = await self._ask(job, "eval", need, now, taken, version=ev.version,
                                    deadline=min(now + self.s.lease_s,
                                                 ev.opened_ts + cfg.timeout_s))  # fmt: skip
                if n:
                    await self.evals.asked(jid, ev.version, n)
        return True

    async def _close(self, job: Job, version: int, now: float) -> None:
        jid = job.spec.job_id
        if await self.evals.close(jid, version, now, job.spec.evaluation.min_reports):
            evs = [e for e in await self.evals.evaluations(jid, OPEN_WINDOW)
                   if e.version == version]  # fmt: skip
            ev = evs[0] if evs else None
            set_fed_gauges(self.metrics, jid, ev)
            log.info(
                "job %s: evaluation of version %d closed (%s reports%s)",
                jid,
                version,
                ev.reports if ev else "?",
                ", complete" if ev and ev.complete else "",
            )

    async def _expire(self, job_id: str, task_id: str, now: float, why: str,
                      rec: TaskRecord | None = None) -> None:  # fmt: skip
        rec = rec or await self.tasks.get(task_id)
        if rec is None:
            await self.tasks.drop_lease(job_id, task_id, "eval")
            return
        ok, _ = await self.tasks.transition(
            rec, "expired", ("offered", "accepted"), expired_ts=repr(now), reason=why
        )
        if not ok:
            await self.tasks.drop_lease(job_id, task_id, rec.kind)
            return
        await self.stats.bump(job_id, f"tasks_{rec.kind}_expired")
        await self.fleet.release_task(rec.device_id, task_id, contributed=False,
                                      outcome=f"{rec.kind}_expired")  # fmt: skip

    async def _ask(
        self, job: Job, kind: str, n: int, now: float, taken: set[str], *,
        version: int = -1, deadline: float, skip: set[str] | None = None,
    ) -> int:  # fmt: skip
        """Issue up to ``n`` ``kind`` tasks to eligible idle devices; returns how many."""
        spec, policy = job.spec, job.eligibility
        if n <= 0:
            return 0
        avoid = taken | (skip or set()) | await self.fleet.held(spec.job_id, now)
        cands, _ = await self.fleet.candidates(
            n * self.s.candidate_factor, acceptor(policy, avoid, now), now
        )
        picks = select(cands, n, policy=policy, now=now, salt=f"{kind}:{spec.job_id}:{int(now)}")
        issued = 0
        for d in picks:
            task = Task(
                task_id=new_task_id(deployment_tag(self.s.topic_prefix)), job_id=spec.job_id,
                device_id=d.device_id, model_name=spec.model_name, upload_token="",
                issued_ts=now, deadline_ts=max(now, deadline), train=spec.train,
                codec=spec.codec, allow_metered=policy.allow_metered,
                min_battery=policy.min_battery, task_kind=kind,  # type: ignore[arg-type]
                model_version=version,
            )  # fmt: skip
            try:
                await issue_task(task, key=self.task_key, tasks=self.tasks, fleet=self.fleet,
                                 sink=self.sink)  # fmt: skip
            except Exception:
                self.metrics.errors.labels(loop="issue").inc()
                log.warning("could not send a %s task; retrying next pass", kind, exc_info=True)
                break
            taken.add(d.device_id)
            self.metrics.side_tasks_issued.labels(kind=kind).inc()
            issued += 1
        return issued

    # ------------------------------------------------------------------ statistics phase
    async def _statistics(self, job: Job, now: float, taken: set[str], outstanding: int) -> None:
        jid = job.spec.job_id
        await self.evals.open_stats(jid, now)
        got = await self.evals.stats(jid)
        if got is None or got[1]:
            return  # closed: the spec write is on its way
        st = got[0]
        reporters = await self.evals.stats_reporters(jid)
        free = max(0, job.spec.concurrency - outstanding)
        avoid = taken | reporters | await self.fleet.held(jid, now)
        more, _ = await self.fleet.candidates(1, acceptor(job.eligibility, avoid, now), now)
        if ready(st, outstanding=outstanding, more_devices=bool(more),
                 min_reports=self.s.stats_min_reports, timeout_s=self.s.stats_timeout_s,
                 now=now):  # fmt: skip
            await self._finish_statistics(job, now)
            return
        await self._ask(job, "stats", free, now, taken, skip=reporters,
                        deadline=now + self.s.lease_s)  # fmt: skip

    async def _finish_statistics(self, job: Job, now: float) -> None:
        jid = job.spec.job_id
        got = await self.evals.stats(jid)
        if got is None:
            return
        st = got[0]
        problem = label_problem(st, job.spec.spec)
        if problem is None and st.rows <= 0:
            problem = "data_empty: the devices that reported hold no training rows"
        if problem is not None:
            log.warning("job %s: statistics phase failed the job: %s", jid, problem)
            if self.fail_job is not None:
                await self.fail_job(jid, problem)
                await self.evals.close_stats(jid, now)
                # its outstanding stats tasks free their devices now (the sweep would next pass)
                await self.after_end(job, now, set())
            return
        if self.write_spec is None:
            log.warning("job %s: no spec writer: cannot end its statistics phase", jid)
            return
        new = standardized_spec(job.spec.spec, st)
        if self.republish is not None:  # `latest` carries the standardisation first
            await self.republish(msgspec.structs.replace(job.spec, spec=new))
        await self.write_spec(jid, new)
        await self.evals.close_stats(jid, now)
        log.info("job %s: statistics of %d devices (%d rows) fixed; training starts",
                 jid, st.reports, st.rows)  # fmt: skip
