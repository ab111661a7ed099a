"""Federated preprocessing: a ``standardize`` job's statistics phase (stats tasks only,
``StatsReport`` ingest, float64 mean/std, label check), the spec written through the job
lifecycle (journal -> Redis -> ``fl.jobs``), a model version carrying it (manifest and
ONNX), then training; the aggregators keep their shard state when ``fl.jobs`` re-publishes
the job with the new spec."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zstandard
from prometheus_client import CollectorRegistry

from coordinator.errors import JobError
from coordinator.jobs import build_job
from coordinator.link import MemoryFleetLink
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from coordinator.standardize import (
    FeatureStats,
    combine,
    job_phase,
    label_problem,
    mean_std,
    ready,
)
from coordinator.task_sink import DirectTaskSink
from schemas.messages import (
    EvalReport,
    ModelSpecMsg,
    ShardVersion,
    StatsReport,
    Task,
    Telemetry,
    decode,
    encode,
)
from tests.test_coordinator_integration import coordinator_settings, eventually
from tests.test_coordinator_support import redis_url
from tests.test_fed_eval import Rig, rig

__all__ = ["redis_url", "rig"]  # fixtures

SPEC = {"family": "softmax", "n_features": 3, "n_classes": 3}


def stats_report(task: Task, x: np.ndarray, labels: list[str], **kw: Any) -> StatsReport:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    base: dict[str, Any] = dict(
        task_id=task.task_id, job_id=task.job_id, device_id=task.device_id,
        upload_token=task.upload_token, num_rows=len(x),
        feature_sum=[float(v) for v in x.sum(axis=0)],
        feature_sumsq=[float(v) for v in (x * x).sum(axis=0)], label_counts=counts,
        ts=time.time(),
    )  # fmt: skip
    base.update(kw)
    return StatsReport(**base)


def device_data(i: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    x = rng.normal(loc=[100.0 * (i + 1), -3.0, 7.0], scale=[5.0 * (i + 1), 0.1, 0.0],
                   size=(n, 3))  # fmt: skip
    return x  # feature 2 is constant


# ------------------------------------------------------------------------------ pure


def test_mean_and_std_match_the_pooled_rows_in_float64() -> None:
    xs = [device_data(i, n) for i, n in enumerate((3, 50, 11))]
    t = Task(task_id="t", job_id="j", device_id="d", model_name="m", upload_token="x",
             issued_ts=1.0, deadline_ts=2.0, task_kind="stats")  # fmt: skip
    st = combine([stats_report(t, x, ["0"] * len(x)) for x in xs])
    mean, std = mean_std(st)
    pooled = np.concatenate(xs).astype(np.float64)
    assert np.allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    assert np.allclose(std[:2], pooled.std(axis=0)[:2], rtol=1e-9)
    assert std[2] == 1.0  # a constant feature is left unscaled


def test_labels_outside_the_jobs_classes_are_named() -> None:
    spec = ModelSpecMsg(**SPEC)  # type: ignore[arg-type]
    st = FeatureStats(label_rows={"0": 5, "2": 3, "7": 12, "x": 1},
                      label_devices={"0": 2, "2": 1, "7": 3, "x": 1})  # fmt: skip
    assert label_problem(st, spec) == (
        "data_labels: label '7' (12 rows on 3 devices) is not one of the job's 3 classes "
        "(and 1 more unknown labels)"
    )
    ok = FeatureStats(label_rows={"0": 1, "1": 1, "2": 1})
    assert label_problem(ok, spec) is None
    named = ModelSpecMsg(**SPEC, labels=("setosa", "versicolor", "virginica"))  # type: ignore[arg-type]
    assert label_problem(FeatureStats(label_rows={"setosa": 4, "2": 1}), named) is None
    assert label_problem(FeatureStats(label_rows={"rose": 4}, label_devices={"rose": 1}),
                         named) is not None  # fmt: skip


def test_when_the_statistics_are_fixed() -> None:
    st = FeatureStats(reports=2, rows=10, opened_ts=100.0)
    kw: dict[str, Any] = dict(min_reports=5, timeout_s=60.0)
    assert not ready(FeatureStats(opened_ts=0.0), outstanding=0, more_devices=False, now=1e9,
                     **kw)  # no report: never  # fmt: skip
    assert not ready(st, outstanding=1, more_devices=False, now=110.0, **kw)
    assert ready(st, outstanding=0, more_devices=False, now=110.0, **kw)  # all asked
    assert not ready(st, outstanding=0, more_devices=True, now=110.0, **kw)
    assert ready(st, outstanding=3, more_devices=True, now=160.0, **kw)  # timeout
    assert ready(FeatureStats(reports=5, rows=1), outstanding=9, more_devices=True, now=0.0,
                 **kw)  # fmt: skip


def test_a_standardize_job_may_not_bring_its_own_mean() -> None:
    body: dict[str, Any] = {
        "model_name": "m",
        "standardize": True,
        "spec": {**SPEC, "input_mean": [0, 0, 0], "input_std": [1, 1, 1]},
    }
    with pytest.raises(JobError) as e:
        build_job(body)
    assert e.value.code == "validation"
    job = build_job({"model_name": "m", "standardize": True, "spec": SPEC})
    assert job_phase(job.spec) == "statistics"
    assert job_phase(build_job({"model_name": "m", "spec": SPEC}).spec) == "training"


# ------------------------------------------------------------------------------ Redis


async def test_the_statistics_phase_fixes_the_spec_then_training_starts(rig: Rig) -> None:
    await rig.devices(4)
    job = await rig.job(concurrency=3, standardize=True, spec=SPEC)
    jid = job.spec.job_id
    v0 = rig.core.registry.latest("m")
    rev0 = rig.journal.latest()[jid][0]
    issued = await rig.core.selector.select_once()
    assert issued[jid] == [] and not rig.sink.of("train")  # statistics first
    stats = rig.sink.of("stats")
    assert len(stats) == 3 and await rig.core.tasks.active_count(jid) == 0
    xs = [device_data(i, n) for i, n in enumerate((20, 5, 40))]
    bad = stats_report(stats[0], xs[0], ["1"] * 20, feature_sum=[1.0, 2.0],
                       feature_sumsq=[1.0, 2.0])  # fmt: skip
    await rig.core.router.handle(f"fleet/{stats[0].device_id}/report", encode(bad))
    assert counter_value(rig.metrics.rejected, source="report", reason="shape") == 1
    for t, x in zip(stats[1:], xs[1:], strict=True):
        rep = stats_report(t, x, ["0", "1", "2", "1", "0"] * (len(x) // 5))
        await rig.core.router.handle(f"fleet/{t.device_id}/report", encode(rep))
        await rig.core.router.handle(f"fleet/{t.device_id}/report", encode(rep))  # re-sent
    assert counter_value(rig.metrics.reports, kind="stats", outcome="duplicate") == 2
    # stats_min_reports=3: the first device's task was refused, one device never asked
    await rig.core.selector.select_once()  # asks the devices that have not reported
    more = rig.sink.of("stats")[3:]
    never_asked = {"d0", "d1", "d2", "d3"} - {t.device_id for t in stats}
    assert {t.device_id for t in more} == {stats[0].device_id} | never_asked
    x3 = device_data(3, 10)
    t3 = more[0]
    await rig.core.router.handle(f"fleet/{t3.device_id}/report",
                                 encode(stats_report(t3, x3, ["2"] * 10)))  # fmt: skip
    await rig.core.selector.select_once()  # three reports: fixed
    new = await rig.core.jobs.get(jid)
    pooled = np.concatenate([xs[1], xs[2], x3]).astype(np.float64)
    assert np.allclose(new.spec.spec.input_mean, pooled.mean(axis=0))
    assert np.allclose(new.spec.spec.input_std[:2], pooled.std(axis=0)[:2])
    assert new.spec.spec.input_std[2] == 1.0
    assert job_phase(new.spec) == "training"
    # through the lifecycle: a new journal revision, and fl.jobs re-published
    rev, journaled = rig.journal.latest()[jid]
    assert rev > rev0 and journaled.spec.spec == new.spec.spec
    assert rig.jobs_topic[-1].spec == new.spec.spec
    # `latest` is a new version with the same weights and the new spec; its ONNX differs
    m = rig.core.registry.latest("m")
    assert m.version == v0.version + 1 and m.digest == v0.digest and m.spec == new.spec.spec
    assert m.shard_versions == [0, 0]
    assert rig.core.registry.onnx(m)[1] != rig.core.registry.onnx(v0)[1]
    await rig.core.selector.select_once()
    assert rig.sink.of("train")  # training has started
    assert len(rig.sink.of("stats")) == len(stats) + len(more)  # no more statistics


async def test_a_label_outside_the_classes_fails_the_job_before_training(rig: Rig) -> None:
    await rig.devices(2)
    job = await rig.job(concurrency=2, standardize=True, spec=SPEC)
    jid = job.spec.job_id
    await rig.core.selector.select_once()
    for t in rig.sink.of("stats"):
        labels = ["0", "7", "7"] if t.device_id == "d0" else ["7", "1", "2"]
        rep = stats_report(t, device_data(0, 3), labels)
        await rig.core.router.handle(f"fleet/{t.device_id}/report", encode(rep))
    await rig.core.selector.select_once()  # every device asked has reported
    failed = await rig.core.jobs.get(jid)
    assert failed.spec.status == "failed"
    assert failed.spec.status_reason == (
        "data_labels: label '7' (3 rows on 2 devices) is not one of the job's 3 classes"
    )
    assert not rig.sink.of("train")


def test_aggregators_keep_their_shard_state_when_the_spec_changes() -> None:
    """``fl.jobs`` re-publishes a known job id with the fixed spec: the partition's job
    shard is keyed by job id and kept (its strategy state and counters), not rebuilt."""
    import msgspec

    from aggregator.shard import PartitionState

    job = build_job({"model_name": "m", "shards": 1, "standardize": True, "spec": SPEC}).spec
    part = PartitionState("fl.updates", 0)
    part.activate(job)
    js = part.jobs[job.job_id]
    js.applied = 7
    new = msgspec.structs.replace(job, spec=msgspec.structs.replace(
        job.spec, input_mean=(1.0, 2.0, 3.0), input_std=(1.0, 1.0, 1.0)))  # fmt: skip
    part.activate(new)
    assert part.jobs[job.job_id] is js and js.applied == 7


@pytest.mark.integration
async def test_a_job_standardizes_evaluates_and_stops_by_itself(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    """The whole path on the real stack (Kafka, Redis; devices played over
    ``MemoryFleetLink``): statistics phase -> spec fixed (manifest, REST phase) -> training
    -> a published version is evaluated on devices -> the federated target stops the job."""
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        stats_min_reports=2, pace_enabled=False
    )
    m = CoordinatorMetrics(registry=CollectorRegistry())
    link = MemoryFleetLink()
    ids = [f"{unique_prefix.strip('.')}-d{i}" for i in range(4)]  # 2 train, 2 evaluate
    name = f"{unique_prefix}m"
    body = {"model_name": name, "shards": 1, "concurrency": 2, "standardize": True,
            "spec": SPEC, "stop": {"target_accuracy": 0.8},
            "evaluation": {"devices": 2, "min_reports": 2, "every_versions": 1}}  # fmt: skip

    def tasks_of(kind: str) -> list[Task]:
        out = [decode(p, Task) for d in ids for p in link.received(d, "task")]
        return [t for t in out if t.task_kind == kind]

    async def some(kind: str, n: int) -> list[Task]:
        async def got() -> list[Task] | None:
            ts = tasks_of(kind)
            return ts if len(ts) >= n else None

        return await eventually(got, timeout=30)

    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(
            Coordinator(s, metrics=m, link=link, task_sink=DirectTaskSink)
        )
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        for d in ids:
            link.send(f"fleet/{d}/telemetry", encode(Telemetry(
                device_id=d, ts=time.time(), battery=90.0, charging=False, network="wifi",
                metered=False)))  # fmt: skip
        r = await http.post("/v1/jobs", json=body, headers={"Authorization": "Bearer adm"})
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]
        assert r.json()["phase"] == "statistics" and r.json()["federated"] is None
        for i, t in enumerate(await some("stats", 2)):
            rep = stats_report(t, device_data(i, 10), ["0", "1"] * 5)
            link.send(f"fleet/{t.device_id}/report", encode(rep))

        async def training() -> dict[str, Any] | None:
            j = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["phase"] == "training" else None

        j = await eventually(training, timeout=30)
        assert len(j["spec"]["input_mean"]) == 3
        latest = (await http.get(f"/v1/models/{name}/latest")).json()
        assert latest["spec"]["input_mean"] == j["spec"]["input_mean"]
        await some("train", 1)
        assert (await http.get(f"/v1/models/{name}/latest.onnx")).status_code == 200

        job = await coord.jobs.get(jid)
        b = job.spec.shard_bounds
        sv = ShardVersion(job_id=jid, model_name=name, shard=0, start=0, stop=b[1], version=1,
                          updates_applied=1, ts=time.time(), params=zstandard.ZstdCompressor(
                              ).compress(np.zeros(b[1], dtype="<f4").tobytes()))  # fmt: skip
        await coord.apply_shard_version(encode(sv))
        for t in await some("eval", 2):
            erep = EvalReport(task_id=t.task_id, job_id=jid, device_id=t.device_id,
                             upload_token=t.upload_token, model_version=t.model_version,
                             num_examples=10, loss_sum=3.0, correct=9,
                             class_examples=[5, 5, 0], class_correct=[5, 4, 0],
                             ts=time.time())  # fmt: skip
            link.send(f"fleet/{t.device_id}/report", encode(erep))

        async def completed() -> dict[str, Any] | None:
            j = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["status"] == "completed" else None

        done = await eventually(completed, timeout=30)
        assert done["status_reason"] == "target_accuracy: 0.900 >= 0.8 for 1 evaluation"
        assert done["phase"] == "ended" and done["federated"]["accuracy"] == pytest.approx(0.9)
        met = (await http.get(f"/v1/jobs/{jid}/metrics")).json()
        assert met["latest"]["examples"] == 20 and met["latest"]["complete"] is True
        text = (await http.get("/metrics")).text
        assert f'fedfleet_coord_fed_accuracy{{job="{jid}"}} 0.9' in text
