"""Federated evaluation: eval tasks for published versions (own leases, not training
slots), ``EvalReport`` ingest (checks, duplicates), the example-weighted aggregate per
version in Redis, closing on count or timeout, REST ``/v1/jobs/{id}/metrics`` and the job's
``federated``/``phase``, Prometheus gauges, and the stop conditions on evaluations
(target held, plateau). Real Redis; the coordinator's core wired by ``build_core`` with
in-memory Kafka/MQTT stand-ins; devices are played by sending their messages to the
router."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zstandard
from prometheus_client import CollectorRegistry

from coordinator.api import AppState, create_app
from coordinator.core import CoordinatorCore, build_core
from coordinator.dispatcher import with_token
from coordinator.errors import JobError
from coordinator.evaluation import Evaluation, combine, complete_accuracies, should_open
from coordinator.jobs import Job, build_job
from coordinator.journal import MemoryJobJournal
from coordinator.lifecycle import set_spec, set_status
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.policy import StopConfig, stop_reason
from coordinator.redis_client import redis_client
from coordinator.settings import CoordinatorSettings
from coordinator.stopping import plateau_reason, target_reason
from coordinator.tasks import load_task_key
from schemas.messages import (
    EvalReport,
    JobSpec,
    ModelSpecMsg,
    ShardVersion,
    Task,
    Telemetry,
    decode,
    encode,
)
from tests.test_coordinator_support import FakeProducer, Published, redis_url

__all__ = ["redis_url"]  # fixture

# ------------------------------------------------------------------------------ rig


class RecordingSink:
    """The task sink: records every task the core hands on, as the dispatcher pushes it
    (its upload token derived from ``key``)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.tasks: list[Task] = []

    async def send(self, task: Task) -> None:
        assert task.upload_token == ""  # a sink never gets the token
        self.tasks.append(with_token(task, self.key))

    def of(self, kind: str) -> list[Task]:
        return [t for t in self.tasks if t.task_kind == kind]


@dataclass
class Rig:
    core: CoordinatorCore
    sink: RecordingSink
    published: Published
    journal: MemoryJobJournal
    jobs_topic: list[JobSpec]
    metrics: CoordinatorMetrics
    redis: Any
    completed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def s(self) -> CoordinatorSettings:
        return self.core.settings

    async def devices(self, n: int, **kw: Any) -> list[str]:
        ids = [f"d{i}" for i in range(n)]
        for d in ids:
            t = Telemetry(device_id=d, ts=time.time(), battery=90.0, charging=False,
                          network="wifi", metered=False, **kw)  # fmt: skip
            await self.core.router.handle(f"fleet/{d}/telemetry", encode(t))
        await self.core.batcher.flush()
        return ids

    async def job(self, **body: Any) -> Job:
        full: dict[str, Any] = {
            "model_name": "m", "shards": 2, "concurrency": 2,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 3}, **body,
        }  # fmt: skip
        job = build_job(full)
        rev = await self.journal.append(job)
        self.core.registry.create_initial(job.spec)
        await self.core.jobs.put(job, revision=rev)
        return job

    async def version(self, job: Job, shard: int, v: int) -> int | None:
        """Shard ``shard`` announces version ``v`` (as an aggregator would)."""
        b = job.spec.shard_bounds
        raw = np.full(b[shard + 1] - b[shard], 0.01 * v, dtype="<f4").tobytes()
        sv = ShardVersion(
            job_id=job.spec.job_id, model_name=job.spec.model_name, shard=shard,
            start=b[shard], stop=b[shard + 1], version=v, updates_applied=v, ts=time.time(),
            params=zstandard.ZstdCompressor().compress(raw),
        )  # fmt: skip
        return await self.core.apply_shard_version(encode(sv))

    async def report(self, task: Task, **kw: Any) -> None:
        await self.core.router.handle(f"fleet/{kw.get('device_id', task.device_id)}/report",
                                      encode(eval_report(task, **kw)))  # fmt: skip

    def app(self) -> Any:
        c = self.core

        async def publish_job(spec: JobSpec) -> None:
            self.jobs_topic.append(spec)

        state = AppState(settings=c.settings, fleet=c.fleet, jobs=c.jobs, tasks=c.tasks,
                         stats=c.stats, registry=c.registry, signer=c.signer,
                         metrics=self.metrics, publish_job=publish_job, journal=self.journal,
                         evals=c.evals)  # fmt: skip
        return create_app(state)


def eval_report(task: Task, **kw: Any) -> EvalReport:
    ce = kw.pop("class_examples", [4, 3, 3])
    cc = kw.pop("class_correct", [4, 2, 1])
    base: dict[str, Any] = dict(
        task_id=task.task_id, job_id=task.job_id, device_id=task.device_id,
        upload_token=task.upload_token, model_version=task.model_version,
        num_examples=sum(ce), loss_sum=0.5 * sum(ce), correct=sum(cc),
        class_examples=ce, class_correct=cc, ts=time.time(),
    )  # fmt: skip
    base.update(kw)
    return EvalReport(**base)


@pytest.fixture
async def rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    redis: Any = redis_client(redis_url)
    s = CoordinatorSettings(
        redis_prefix=f"e{uuid.uuid4().hex[:8]}:", admin_token="secret",
        model_store_dir=tmp_path / "models", signing_key_path=tmp_path / "key",
        task_key_path=tmp_path / "task.key", lease_s=30.0, telemetry_ttl_s=600.0,
        stats_min_reports=3, pace_enabled=False,
    )  # fmt: skip
    m = CoordinatorMetrics(registry=CollectorRegistry())
    key = load_task_key(s.task_key_path)
    sink, published, journal = RecordingSink(key), Published(), MemoryJobJournal()
    jobs_topic: list[JobSpec] = []
    holder: dict[str, Rig] = {}

    async def publish_job(spec: JobSpec) -> None:
        jobs_topic.append(spec)

    async def fail_job(job_id: str, reason: str) -> None:
        await set_status(job_id, "failed", reason, journal=journal, jobs=core.jobs,
                         publish_job=publish_job)  # fmt: skip

    async def complete_job(job: Job, reason: str) -> None:  # as the service: pin, then end
        holder["rig"].completed.append((job.spec.job_id, reason))
        v = core.registry.newest_version(job.spec.model_name)
        if v is not None:
            core.registry.rollback(job.spec.model_name, v)
        await set_status(job.spec.job_id, "completed", reason, journal=journal,
                         jobs=core.jobs, publish_job=publish_job)  # fmt: skip

    async def write_spec(job_id: str, model: ModelSpecMsg) -> None:
        await set_spec(job_id, model, journal=journal, jobs=core.jobs, publish_job=publish_job)

    core = build_core(s, redis, metrics=m, producer=FakeProducer(), task_sink=sink,
                      publish=published, fail_job=fail_job, complete_job=complete_job,
                      write_spec=write_spec, task_key=key)  # fmt: skip
    holder["rig"] = r = Rig(core, sink, published, journal, jobs_topic, m, redis)
    yield r
    await redis.aclose()


# ------------------------------------------------------------------------------ pure


def test_reports_combine_example_weighted_not_as_a_mean_of_device_means() -> None:
    # Prepare: three devices' held-out sets, per example (true class, predicted, loss)
    rng = np.random.default_rng(1)
    devices = []
    for n in (2, 7, 31):
        y = rng.integers(0, 3, size=n)
        pred = np.where(rng.random(n) < 0.6, y, (y + 1) % 3)
        loss = rng.random(n) * 2
        devices.append((y, pred, loss))
    t = Task(task_id="t1", job_id="j", device_id="d", model_name="m", upload_token="x",
             issued_ts=1.0, deadline_ts=2.0, task_kind="eval", model_version=4)  # fmt: skip
    reports = [
        eval_report(t, num_examples=len(y), loss_sum=float(loss.sum()),
                    correct=int((y == p).sum()),
                    class_examples=[int((y == c).sum()) for c in range(3)],
                    class_correct=[int(((y == c) & (p == c)).sum()) for c in range(3)])
        for y, p, loss in devices
    ]  # fmt: skip
    # Execute
    ev = combine(4, 10.0, reports)
    # Assert: the pooled examples, computed independently
    y_all = np.concatenate([d[0] for d in devices])
    p_all = np.concatenate([d[1] for d in devices])
    l_all = np.concatenate([d[2] for d in devices])
    assert ev.examples == 40 and ev.reports == 3
    assert ev.accuracy == pytest.approx(float((y_all == p_all).mean()))
    assert ev.loss == pytest.approx(float(l_all.mean()))
    mean_of_means = np.mean([(y == p).mean() for y, p, _ in devices])
    assert ev.accuracy != pytest.approx(float(mean_of_means))
    assert list(ev.class_examples) == [int((y_all == c).sum()) for c in range(3)]
    assert Evaluation(version=1, opened_ts=1.0).accuracy is None  # no examples: no figure


def test_which_versions_are_evaluated() -> None:
    assert not should_open(3, [0, 0], None, 5)  # the initial model: nothing trained
    assert should_open(1, [1, 0], None, 5)  # the first trained version
    assert not should_open(4, [2, 2], 1, 5) and should_open(6, [3, 3], 1, 5)


def test_stop_conditions_on_evaluations_are_pure() -> None:
    assert target_reason([0.96, 0.953], 0.95, 2) == (
        "target_accuracy: 0.953 >= 0.95 for 2 evaluations"
    )
    assert target_reason([0.96, 0.94, 0.953], 0.95, 2) is None  # not consecutive
    assert target_reason([0.96], 0.95, 2) is None  # not yet held long enough
    assert target_reason([0.99], 0.0, 1) is None  # off
    # plateau W=2: best of the last 2 vs the best before them
    assert plateau_reason([0.5, 0.8], 2, 0.001) is None  # needs W + 1 evaluations
    assert plateau_reason([0.5, 0.8, 0.8005, 0.79], 2, 0.001) == (
        "plateau: best accuracy 0.800 of the last 2 evaluations does not beat 0.800 by "
        "more than 0.001"
    )
    assert plateau_reason([0.5, 0.8, 0.81, 0.805], 2, 0.001) is None  # 0.81 beats 0.8
    assert plateau_reason([0.5, 0.8, 0.7, 0.9], 2, 0.001) is None  # improved
    assert plateau_reason([0.5, 0.8, 0.81], 0, 0.001) is None  # off
    stop = StopConfig(target_accuracy=0.9, target_hold=2)
    assert (stop_reason(stop, 0, 0.0, 1.0, [0.91, 0.92]) or "").startswith("target_accuracy")
    assert stop_reason(stop, 0, 0.0, 1.0, [0.91]) is None
    for bad in ({"target_accuracy": 1.5}, {"target_hold": 0}, {"plateau_window": -1},
                {"plateau_delta": -0.1}):  # fmt: skip
        with pytest.raises(JobError):
            StopConfig.from_dict(bad)
    evs = [
        Evaluation(version=1, opened_ts=1, examples=10, correct=5, complete=True),
        Evaluation(version=2, opened_ts=2, examples=10, correct=9, complete=False),
    ]
    assert complete_accuracies(evs) == [0.5]  # an incomplete evaluation does not count


def test_plateau_delta_is_strict() -> None:
    accs = [0.5, 0.8, 0.7, 0.802]  # best recent 0.802, best before 0.8: +0.002
    assert plateau_reason(accs, 2, 0.001) is None  # beats by more than 0.001
    assert plateau_reason(accs, 2, 0.003) is not None


# ------------------------------------------------------------------------------ Redis


async def test_an_evaluation_asks_idle_devices_folds_reports_and_closes(rig: Rig) -> None:
    await rig.devices(5)
    job = await rig.job(evaluation={"devices": 3, "min_reports": 2, "every_versions": 2})
    jid = job.spec.job_id
    assert await rig.version(job, 0, 1) == 1  # global version 1: shard versions [1, 0]
    assert [e.version for e in await rig.core.evals.evaluations(jid)] == [1]

    issued = await rig.core.selector.select_once()
    evals = rig.sink.of("eval")
    assert len(evals) == 3 and {t.model_version for t in evals} == {1}
    assert len(issued[jid]) == 2 == len(rig.sink.of("train"))  # training: the other two
    assert not {t.device_id for t in evals} & {t.device_id for t in rig.sink.of("train")}
    assert await rig.core.tasks.active_count(jid) == 2  # eval tasks take no training slot
    st = await rig.core.stats.stats(jid)
    assert st["tasks_issued"] == 2 and st["tasks_eval_issued"] == 3

    a, b, c = evals
    await rig.report(a, upload_token="wrong")  # refused, counted
    await rig.report(a, device_id="d9")  # another device's task
    await rig.report(a, class_examples=[1, 1], class_correct=[1, 1])  # 2 classes, job has 3
    assert counter_value(rig.metrics.rejected, source="report", reason="bad_token") == 1
    assert counter_value(rig.metrics.rejected, source="report", reason="shape") == 1
    await rig.report(b, class_examples=[10, 0, 0], class_correct=[9, 0, 0], loss_sum=2.0)
    await rig.report(b)  # re-sent: a duplicate
    assert counter_value(rig.metrics.reports, kind="eval", outcome="duplicate") == 1
    await rig.report(c, class_examples=[0, 20, 10], class_correct=[0, 15, 5], loss_sum=12.0)
    evs = await rig.core.evals.evaluations(jid)
    ev = evs[0]
    assert ev.complete and ev.closed_ts is not None and ev.reports == 2  # closed on count
    assert ev.examples == 40 and ev.correct == 29 and ev.loss == pytest.approx(14.0 / 40)
    assert ev.class_examples == (10, 20, 10) and ev.class_correct == (9, 15, 5)
    assert rig.metrics.fed_accuracy.labels(job=jid)._value.get() == pytest.approx(29 / 40)

    # a's task (refused for its content) ended; b and c reported: all three are free
    views = {v.device_id: v for v in await rig.core.fleet.live_views()}
    assert all(views[t.device_id].current_task == "" for t in evals)
    rec = await rig.core.tasks.get(a.task_id)
    assert rec is not None and rec.state == "aborted"

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rig.app()),
                                 base_url="http://t") as http:  # fmt: skip
        m = (await http.get(f"/v1/jobs/{jid}/metrics")).json()
        assert m["job_id"] == jid and len(m["evaluations"]) == 1
        assert m["latest"] == m["evaluations"][0]
        assert m["latest"]["accuracy"] == pytest.approx(29 / 40)
        assert set(m["latest"]) == {"version", "reports", "examples", "loss", "accuracy",
                                    "class_examples", "class_correct", "complete",
                                    "final", "opened_ts", "closed_ts"}  # fmt: skip
        j = (await http.get(f"/v1/jobs/{jid}")).json()
        assert j["federated"] == m["latest"] and j["phase"] == "training"
        assert j["stats"]["tasks_eval_issued"] == 3
        assert (await http.get("/v1/jobs/nope/metrics")).status_code == 404


async def test_an_update_for_an_eval_task_is_refused(rig: Rig) -> None:
    from tests.test_coordinator_ingest_support import update_for

    await rig.devices(1)
    job = await rig.job(concurrency=1, evaluation={"devices": 1, "min_reports": 1})
    await rig.version(job, 0, 1)
    await rig.core.selector.select_once()
    (t,) = rig.sink.of("eval")
    upd = update_for(t, job.spec.shard_bounds)
    await rig.core.router.handle(f"fleet/{t.device_id}/update", encode(upd))
    assert counter_value(rig.metrics.rejected, source="update", reason="wrong_kind") == 1
    await rig.report(t, model_version=0)  # not the version it was asked to score
    assert counter_value(rig.metrics.rejected, source="report", reason="wrong_version") == 1


async def test_an_evaluation_closes_at_its_timeout_with_what_it_has(rig: Rig) -> None:
    await rig.devices(3)
    job = await rig.job(
        concurrency=1,
        evaluation={"devices": 2, "min_reports": 2, "timeout_s": 50, "every_versions": 1},
    )
    jid = job.spec.job_id
    await rig.version(job, 0, 1)
    now = time.time()
    await rig.core.selector.select_once(now)
    a, b = rig.sink.of("eval")
    await rig.report(a)
    assert (await rig.core.evals.evaluations(jid))[0].closed_ts is None
    await rig.core.selector.select_once(now + 60)  # past the timeout
    ev = (await rig.core.evals.evaluations(jid))[0]
    assert ev.closed_ts is not None and not ev.complete and ev.reports == 1
    rec = await rig.core.tasks.get(b.task_id)
    assert rec is not None and rec.state == "expired"  # its leftover task: expired
    await rig.report(b)  # too late
    assert counter_value(rig.metrics.reports, kind="eval", outcome="rejected") == 0
    assert (await rig.core.evals.evaluations(jid))[0].reports == 1
    # the next due version opens a new evaluation; an incomplete one is not "latest"
    assert await rig.version(job, 1, 5) is not None
    assert [e.version for e in await rig.core.evals.evaluations(jid)] == [1, 2]


async def test_a_job_stops_once_its_federated_target_held(rig: Rig) -> None:
    await rig.devices(3)  # one trains, one scores each version, one is left for the final
    job = await rig.job(
        concurrency=1, stop={"target_accuracy": 0.9, "target_hold": 2},
        evaluation={"devices": 1, "min_reports": 1, "every_versions": 1, "final_devices": 2},
    )  # fmt: skip
    jid = job.spec.job_id
    for v, acc in ((1, [3, 3, 3]), (2, [3, 3, 3])):  # 9 of 10 right
        await rig.version(job, 0, v)
        await rig.core.selector.select_once()
        t = rig.sink.of("eval")[-1]
        assert t.model_version == (await rig.core.evals.last_version(jid))
        await rig.report(t, class_examples=[4, 3, 3], class_correct=acc)
        if v == 1:
            assert not rig.completed
    n = len(rig.sink.tasks)
    await rig.core.selector.select_once()
    assert rig.completed == [(jid, "target_accuracy: 0.900 >= 0.9 for 2 evaluations")]
    assert (await rig.core.jobs.get(jid)).spec.status == "completed"
    await rig.version(job, 0, 9)  # a late version: after the pin, not what is evaluated
    await rig.core.selector.select_once()
    # nothing more but the final evaluation: the pinned version (v2, scored by one device
    # already) is scored by one more device, never by the same one twice
    (fin,) = rig.sink.tasks[n:]
    assert fin.task_kind == "eval" and fin.model_version == rig.core.registry.pinned("m") == 2
    assert fin.device_id != rig.sink.tasks[n - 1].device_id
    await rig.report(fin, class_examples=[4, 3, 3], class_correct=[4, 3, 3])
    final = [e for e in await rig.core.evals.evaluations(jid) if e.final]
    assert final[0].complete and final[0].reports == 2 and final[0].accuracy == 19 / 20
    await rig.core.selector.select_once()
    assert len(rig.sink.tasks) == n + 1 and await rig.core.jobs.ending() == []
    assert [decode(encode(s), JobSpec).status for s in rig.jobs_topic][-1] == "completed"
