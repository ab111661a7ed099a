"""Ingest of ``EvalReport`` / ``StatsReport`` (``fleet/{device_id}/report``, no ack).

A report counts once for its task: the device in the topic is the one in the report and
the one the task was given to, the job matches, the one-use token matches, the task is of
the report's kind (``eval`` / ``stats``), and its content fits the job (``n_classes``
classes, the scored version, ``n_features`` sums). It is then folded into its aggregate by
one script (``EvalStore``): a re-sent report finds its task ``reported`` and is dropped as
a duplicate; one for an evaluation that already closed is dropped (``closed``) and its
task expired. Every refusal is counted in ``fedfleet_coord_rejected_total{source="report"}``
and ``fedfleet_coord_reports_total{kind,outcome}``; nothing is answered to the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from coordinator.errors import NotFound
from coordinator.evalstore import EvalStore, Folded
from coordinator.evaluation import report_problem
from coordinator.fleet import FleetStore
from coordinator.jobs import JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.sidetasks import set_fed_gauges
from coordinator.tasks import TaskRecord, TaskStore, token_matches
from schemas.messages import EvalReport, StatsReport

Report = EvalReport | StatsReport


class ReportHandler:
    def __init__(
        self, *, tasks: TaskStore, jobs: JobStore, fleet: FleetStore, stats: JobStatsStore,
        evals: EvalStore, metrics: CoordinatorMetrics,
        on_report: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.tasks = tasks
        self.jobs = jobs
        self.fleet = fleet
        self.stats = stats
        self.evals = evals
        self.metrics = metrics
        self.on_report = on_report  # wakes the selector (a closed evaluation frees devices)

    def _count(self, kind: str, outcome: str, reason: str = "") -> str:
        self.metrics.reports.labels(kind=kind, outcome=outcome).inc()
        if reason:
            self.metrics.rejected.labels(source="report", reason=reason).inc()
        return outcome

    async def _check(self, r: Report, kind: str, dev: str) -> TaskRecord | str:
        """The report's task, or the reason it is refused."""
        if r.device_id != dev:
            return "device_mismatch"
        rec = await self.tasks.get(r.task_id)
        if rec is None:
            return "unknown_task"
        if rec.device_id != dev:
            return "wrong_device"
        if rec.job_id != r.job_id:
            return "wrong_job"
        if not token_matches(r.upload_token, rec.token_sha):
            return "bad_token"
        if rec.kind != kind:
            return "wrong_kind"
        return rec

    async def handle(self, r: Report, topic_device: str) -> str:
        """Process one decoded report; returns its outcome (accepted, duplicate, closed,
        rejected)."""
        kind = "eval" if isinstance(r, EvalReport) else "stats"
        got = await self._check(r, kind, topic_device)
        if isinstance(got, str):
            return self._count(kind, "rejected", got)
        rec = got
        try:
            spec = (await self.jobs.get(rec.job_id)).spec
        except NotFound:
            return self._count(kind, "rejected", "unknown_job")
        if isinstance(r, EvalReport):
            problem = report_problem(r, spec.spec.n_classes, rec.model_version)
        else:
            problem = "shape" if len(r.feature_sum) != spec.spec.n_features else None
        if problem is not None:
            await self._end(rec, "aborted", f"report {problem}", f"report_{problem}")
            return self._count(kind, "rejected", problem)
        now = time.time()
        folded: Folded
        if isinstance(r, EvalReport):
            folded = await self.evals.fold_eval(
                rec, r, min_reports=spec.evaluation.min_reports, now=now
            )
        else:
            folded = await self.evals.fold_stats(rec, r, now=now)
        if folded in ("ok", "closed_now"):
            await self.stats.bump(rec.job_id, f"tasks_{kind}_reported")
            await self.fleet.release_task(
                rec.device_id,
                rec.task_id,
                contributed=False,
                outcome="evaluated" if kind == "eval" else "stats",
            )
            if folded == "closed_now":
                evs = await self.evals.evaluations(rec.job_id, 8)
                ev = next((e for e in evs if e.version == rec.model_version), None)
                set_fed_gauges(self.metrics, rec.job_id, ev)
            if self.on_report is not None:
                self.on_report(rec.job_id)
            return self._count(kind, "accepted")
        if folded == "duplicate":
            return self._count(kind, "duplicate", "duplicate")
        if folded == "closed":  # the evaluation / phase had ended: free the device
            await self._end(rec, "expired", "closed", f"{kind}_closed")
            return self._count(kind, "closed")
        return self._count(kind, "rejected", folded)

    async def _end(self, rec: TaskRecord, state: str, reason: str, outcome: str) -> None:
        ok, _ = await self.tasks.transition(rec, state, ("offered", "accepted"),
                                            reason=reason[:200])  # fmt: skip
        if ok:
            await self.fleet.release_task(rec.device_id, rec.task_id, contributed=False,
                                          outcome=outcome)  # fmt: skip
