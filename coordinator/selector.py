"""Selection loop: expire leases, keep ``concurrency`` devices training per job, pace the rest.

Each pass (every ``selection_tick_s``, or sooner when an upload frees a slot):

1. leases past their deadline -> task ``expired``; the device is released with a cooldown
   of one lease so the slot is re-issued to *another* eligible device;
2. free slots = ``concurrency`` - active leases; ``policy.select`` picks devices;
3. each pick gets a task (lease in Redis, the SHA-256 of its one-use token derived from
   ``task_key``) produced to ``fl.tasks`` without the token (the dispatcher fills it in);
4. eligible devices left waiting get a ``Pace`` (at most once per their delay).

Before 2, per job: a met stop condition (``policy.stop_reason``, also on federated
evaluations) ends it; ``SideTasks.run`` (``coordinator.sidetasks``) issues evaluation
tasks to idle devices (no training slot) and, for a ``standardize`` job still in its
statistics phase, only statistics tasks (the job does not train that pass).

Jobs with ``selection.mode == "sync"`` run in rounds instead (``sync_round``): a round
closes on count or deadline, and the next one opens only when ``policy.next_round``
allows it — once the job's newest published model moved past the shard versions recorded
when the closed round opened (``latest_versions``), so invited devices never pull the
old model (their updates would be FedAvg ``wrong_round`` rejects). A round admits at most
its ``target`` uploads: its tasks carry the round number and the upload handler takes a
slot atomically (``TaskStore.claim_in_round``); the surplus is refused (``round_closed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from coordinator.errors import NotFound
from coordinator.fleet import FleetStore
from coordinator.issuing import issue_task
from coordinator.jobs import Job, JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.lock import RedisLock
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import (
    DeviceView,
    NextRound,
    acceptor,
    decode_versions,
    encode_versions,
    next_round,
    over_select,
    pace_delay,
    round_carry,
    round_closed,
    round_target,
    select,
    stop_reason,
    sync_round_size,
)
from coordinator.rounds import RoundStore
from coordinator.settings import CoordinatorSettings
from coordinator.sidetasks import SideTasks
from coordinator.task_sink import TaskSink
from coordinator.tasks import TaskStore, deployment_tag, new_task_id
from schemas.aio import cancelling
from schemas.messages import Pace, Task, encode

log = logging.getLogger(__name__)

# A paced device stays silent for its delay; keep that well inside the liveness TTL so it
# reports again (and stays selectable) before the coordinator would count it offline.
PACE_TTL_SHARE = 0.5

Publish = Callable[[str, bytes, int], Awaitable[None]]
# Shard versions of the newest published model of a job (None: unknown / none yet).
LatestVersions = Callable[[Job], Awaitable[list[int] | None]]


class Selector:
    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        fleet: FleetStore,
        tasks: TaskStore,
        jobs: JobStore,
        rounds: RoundStore,
        stats: JobStatsStore,
        lock: RedisLock,
        task_sink: TaskSink,
        task_key: bytes,
        publish: Publish | None,
        metrics: CoordinatorMetrics,
        latest_versions: LatestVersions | None = None,
        on_complete: Callable[[Job, str], Awaitable[None]] | None = None,
        side: SideTasks | None = None,
    ) -> None:
        self.s = settings
        self.fleet = fleet
        self.tasks = tasks
        self.jobs = jobs
        self.rounds = rounds
        self.stats = stats
        self.lock = lock
        self.task_sink = task_sink
        self.task_key = task_key  # the deployment's key upload tokens are derived with
        self.publish = publish
        self.metrics = metrics
        self.latest_versions = latest_versions
        self.on_complete = on_complete  # a job met a stop condition (StopConfig)
        self.side = side  # evaluation and statistics tasks (coordinator.sidetasks)
        self._wake = asyncio.Event()
        self._next_pace: dict[str, float] = {}
        self._reissue: dict[str, list[str]] = {}

    def wake(self, _job_id: str = "") -> None:
        self._wake.set()

    async def expire(self, job: Job, now: float) -> list[str]:
        """Expire overdue leases of ``job``; returns the devices that let them lapse."""
        lapsed: list[str] = []
        for task_id in await self.tasks.expired(job.spec.job_id, now):
            rec = await self.tasks.get(task_id)
            if rec is None:  # hash gone (TTL): drop the stale lease
                await self.tasks.drop_lease(job.spec.job_id, task_id)
                continue
            ok, prev = await self.tasks.transition(
                rec, "expired", ("offered", "accepted"), expired_ts=repr(now)
            )
            if not ok:
                # Not active any more (or an upload claimed but never confirmed: the device
                # re-sends it from its outbox and it is produced again then). Free the slot.
                await self.tasks.drop_lease(job.spec.job_id, task_id)
                if prev == "uploading":
                    await self.fleet.release_task(
                        rec.device_id, task_id, contributed=False, outcome="upload_incomplete"
                    )
                continue
            self.metrics.tasks_expired.inc()
            await self.stats.bump(job.spec.job_id, "tasks_expired")
            await self.fleet.release_task(
                rec.device_id,
                task_id,
                contributed=False,
                cooldown_until=now + self.s.lease_s,
                outcome="expired",
            )
            self._reissue.setdefault(job.spec.job_id, []).append(task_id)
            lapsed.append(rec.device_id)
        return lapsed

    async def issue(
        self,
        job: Job,
        device: DeviceView,
        now: float,
        deadline_ts: float | None = None,
        round_no: int = 0,
    ) -> Task:
        spec = job.spec
        reissue = self._reissue.get(spec.job_id) or []
        task = Task(
            task_id=new_task_id(deployment_tag(self.s.topic_prefix)),
            job_id=spec.job_id,
            device_id=device.device_id,
            model_name=spec.model_name,
            upload_token="",  # derived by issue_task; never handed to the sink
            issued_ts=now,
            deadline_ts=deadline_ts if deadline_ts is not None else now + self.s.lease_s,
            train=spec.train,
            codec=spec.codec,
            allow_metered=job.eligibility.allow_metered,
            min_battery=job.eligibility.min_battery,
        )
        task = await issue_task(task, key=self.task_key, tasks=self.tasks, fleet=self.fleet,
                                sink=self.task_sink, reissue_of=reissue.pop(0) if reissue else "",
                                round_no=round_no)  # fmt: skip
        self.metrics.tasks_issued.inc()
        return task

    async def _issue_all(
        self,
        job: Job,
        picks: list[DeviceView],
        now: float,
        taken: set[str],
        deadline_ts: float | None = None,
        round_no: int = 0,
    ) -> list[Task]:
        out: list[Task] = []
        for d in picks:
            try:
                out.append(await self.issue(job, d, now, deadline_ts, round_no))
            except Exception:
                self.metrics.errors.labels(loop="issue").inc()
                log.warning(
                    "could not produce a task to %s; retrying next pass",
                    self.s.tasks_topic,
                    exc_info=True,
                )
                break
            taken.add(d.device_id)
        return out

    async def select_once(self, now: float | None = None) -> dict[str, list[Task]]:
        """One selection pass over all running jobs; returns the tasks issued per job."""
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        jobs = await self.jobs.running()
        issued: dict[str, list[Task]] = {}
        taken: set[str] = set()
        await self._sweep_ended(now, taken)
        waiting: dict[str, None] = {}
        active_total = 0
        pacing = self.s.pace_enabled and self.publish is not None
        for job in jobs:
            if await self._completed(job, now):
                issued[job.spec.job_id] = []
                continue
            if self.side is not None and not await self.side.run(job, now, taken):
                issued[job.spec.job_id] = []  # statistics phase: no training yet
                continue
            if job.selection.mode == "sync":
                out = await self.sync_round(job, now, taken)
                issued[job.spec.job_id] = out
                active_total += await self.tasks.active_count(job.spec.job_id)
                continue
            taken.update(await self.expire(job, now))
            active = await self.tasks.active_count(job.spec.job_id)
            free = max(0, job.spec.concurrency - active)
            # Over-read so picks can be spread across network types, and so a page of
            # waiting devices can be paced.
            want = free * self.s.candidate_factor + (self.s.pace_per_pass if pacing else 0)
            policy = job.eligibility
            cands: list[DeviceView] = []
            if want:
                skip = taken | await self.fleet.held(job.spec.job_id, now)  # data holds
                cands, _ = await self.fleet.candidates(want, acceptor(policy, skip, now), now)
            picks = select(cands, free, policy=policy, now=now,
                           salt=f"{job.spec.job_id}:{int(now)}")  # fmt: skip
            out = await self._issue_all(job, picks, now, taken)
            issued[job.spec.job_id] = out
            active_total += active + len(out)
            if pacing:
                waiting.update((d.device_id, None) for d in cands if d.device_id not in taken)
        self.metrics.training_now.set(active_total)
        self.metrics.selection_seconds.observe(time.perf_counter() - t0)
        if pacing and waiting:
            await self._pace([d for d in waiting if d not in taken], now, jobs)
        return issued

    async def _completed(self, job: Job, now: float) -> bool:
        """End ``job`` if one of its stop conditions holds (no task is issued for it)."""
        if self.on_complete is None or not job.stop.any:
            return False
        applied = await self.stats.get(job.spec.job_id, "updates_applied")
        accs: list[float] = []
        if job.stop.on_evaluations and self.side is not None:
            accs = await self.side.accuracies(job)
        reason = stop_reason(job.stop, applied, job.spec.created_ts, now, accs)
        if reason is None:
            return False
        await self.on_complete(job, reason)  # the next pass sweeps it (final evaluation)
        return True

    async def _sweep_ended(self, now: float, taken: set[str]) -> None:
        """Ended jobs (``JobStore.ending``): close their open evaluations, expire their side
        tasks, run a completed job's final evaluation (``SideTasks.after_end``)."""
        for jid in await self.jobs.ending():
            try:
                job = await self.jobs.get(jid)
            except NotFound:
                await self.jobs.swept(jid)
                continue
            if job.spec.status == "running" or self.side is None:
                await self.jobs.swept(jid)
            elif await self.side.after_end(job, now, taken):
                await self.jobs.swept(jid)

    async def _versions(self, job: Job) -> list[int] | None:
        if self.latest_versions is None:
            return None
        try:
            return await self.latest_versions(job)
        except Exception:
            self.metrics.errors.labels(loop="round_versions").inc()
            log.warning("no model versions for %s", job.spec.job_id, exc_info=True)
            return None

    @staticmethod
    def _round_size(job: Job) -> int:
        spec = job.spec  # build_job makes concurrency == buffer_size for sync FedAvg
        return sync_round_size(spec.concurrency, spec.strategy.name, spec.strategy.buffer_size)

    async def _close_round(self, jid: str, now: float) -> None:
        """Expire the closed round's leftover tasks and release their devices."""
        for task_id in await self.tasks.leased(jid):
            rec = await self.tasks.get(task_id)
            if rec is None:
                await self.tasks.drop_lease(jid, task_id)
                continue
            ok, _ = await self.tasks.transition(
                rec,
                "expired",
                ("offered", "accepted"),
                expired_ts=repr(now),
                reason="round_closed",
            )
            if ok:
                await self.stats.bump(jid, "tasks_round_closed")
                await self.fleet.release_task(
                    rec.device_id, task_id, contributed=False, outcome="round_closed"
                )

    async def sync_round(self, job: Job, now: float, taken: set[str]) -> list[Task]:
        """Synchronous baseline: run the job in rounds with over-selection and a deadline.

        Round hash ``{p}{t}round:{job}`` (``rounds.RoundStore``): ``round``, ``started``,
        ``deadline``, ``target``
        (uploads that fill it), ``taken`` (uploads it admitted: incremented atomically by
        ``TaskStore.claim_in_round``, never past ``target``), ``invited``, ``carry``
        (updates of earlier short rounds still buffered on the aggregators), ``versions0``
        (shard versions of the newest model at open), ``closed`` (when it closed; no upload
        is admitted after that and its leftover tasks were expired). Each task records its
        round number, so an upload only ever counts in its own round.
        """
        jid = job.spec.job_id
        k = self._round_size(job)
        cur = await self.rounds.get(jid)
        carry = 0
        decision: NextRound | None = None
        latest: list[int] | None = None
        if cur:
            in_round = int(cur.get("taken") or 0)
            deadline_ts = float(cur["deadline"])
            target = int(cur.get("target") or k)
            if not cur.get("closed"):
                if not round_closed(in_round, target, deadline_ts, now):
                    return []
                in_round = await self.rounds.close(jid, now)
                cur["closed"], cur["taken"] = repr(now), str(in_round)
                await self._close_round(jid, now)
            base = decode_versions(cur.get("versions0"))
            latest = await self._versions(job) if base else None
            pending = int(cur.get("carry") or 0) + in_round
            decision = next_round(
                closed=True, pending=pending, round_size=k, base_versions=base,
                latest_versions=latest, deadline_ts=deadline_ts,
                grace_s=job.selection.round_grace_s, now=now,
            )  # fmt: skip
            if decision == "wait":
                return []
            carry = round_carry(decision, pending)
        target = round_target(k, carry)
        invite = over_select(target, job.selection.over_selection)
        skip = taken | await self.fleet.held(job.spec.job_id, now)  # data holds
        cands, _ = await self.fleet.candidates(
            invite * self.s.candidate_factor, acceptor(job.eligibility, skip, now), now
        )
        picks = select(cands, invite, policy=job.eligibility, now=now, salt=f"{jid}:{int(now)}")
        if not picks:
            return []
        # The model the invited devices will pull (just read if the round was tracked).
        versions = latest if latest is not None else await self._versions(job)
        deadline = now + job.selection.round_deadline_s
        n = int(cur.get("round", 0)) + 1
        # Open the round before its tasks go out, so no upload can arrive before it.
        await self.rounds.write(jid, {
            "round": n, "started": repr(now), "deadline": repr(deadline), "target": target,
            "taken": 0, "invited": len(picks), "carry": carry,
            "versions0": encode_versions(versions),
        })  # fmt: skip
        out = await self._issue_all(job, picks, now, taken, deadline, round_no=n)
        if not out:
            await self.rounds.write(jid, cur)  # nothing went out: the closed round stands
            return []
        if len(out) < len(picks):
            await self.rounds.set_invited(jid, len(out))
        if decision is not None:
            await self.stats.bump(jid, f"rounds_opened_{decision}")
        if decision == "grace":
            self.metrics.errors.labels(loop="round_grace").inc()
            log.warning(
                "job %s: round %s did not move the model %.0fs past its deadline; "
                "opened round %s anyway",
                jid, cur.get("round"), now - float(cur["deadline"]), int(cur["round"]) + 1,
            )  # fmt: skip
        return out

    async def _pace(self, waiting: list[str], now: float, jobs: list[Job]) -> None:
        slots_per_s = max(1.0, sum(j.spec.concurrency for j in jobs) / max(self.s.lease_s, 1.0))
        assert self.publish is not None
        budget = self.s.pace_max_per_tick
        for dev in waiting:
            if self._next_pace.get(dev, 0.0) > now:
                continue
            if budget <= 0:
                break
            budget -= 1
            delay = pace_delay(
                dev,
                self.s.pace_retry_s,
                len(waiting),
                slots_per_s,
                str(int(now)),
                max_s=PACE_TTL_SHARE * self.s.telemetry_ttl_s,
            )
            self._next_pace[dev] = now + delay
            await self.publish(
                f"fleet/{dev}/pace", encode(Pace(device_id=dev, retry_after_s=delay, ts=now)), 0
            )
            self.metrics.pace_sent.inc()
        if len(self._next_pace) > 4 * max(len(waiting), 1000):
            self._next_pace = {k: v for k, v in self._next_pace.items() if v > now}

    async def locked_pass(self) -> dict[str, list[Task]] | None:
        """``select_once`` under a Redis lock, so only one coordinator selects at a time.

        Returns None when another process holds the lock (its pass covers every job).
        """
        token = await self.lock.acquire(int(max(5.0, 10 * self.s.selection_tick_s) * 1000))
        if token is None:
            return None
        try:
            return await self.select_once()
        finally:
            await self.lock.release(token)

    async def run(self) -> None:
        while True:
            try:
                await self.locked_pass()
            except Exception:
                if cancelling():  # a pass that failed because it was cancelled: stop
                    raise asyncio.CancelledError from None
                self.metrics.errors.labels(loop="selector").inc()
                log.exception("selection pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.s.selection_tick_s)
            except TimeoutError:
                pass
            self._wake.clear()

