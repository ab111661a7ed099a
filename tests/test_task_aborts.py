"""Visible failures: a device whose data cannot train the job aborts with a typed reason,
the coordinator counts it per job and reason (REST ``aborts``, ``/metrics``), holds that
device off the job (no re-issue storm), and fails a job that never got an update while its
tasks keep aborting for one data reason."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from coordinator.aborts import abort_code
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from edge_agent.data import Dataset, check_dataset, data_abort_reason, load_dataset
from edge_agent.errors import DataError
from schemas.messages import Task, TaskResponse
from tests.test_coordinator_integration import Device, coordinator_settings, eventually
from tests.test_sync_rounds import online

AUTH = {"Authorization": "Bearer adm"}


def ds(n: int, d: int, top: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.normal(size=(n, d)).astype(np.float32),
                   (np.arange(n) % (top + 1)).astype(np.int64))  # fmt: skip


@pytest.mark.parametrize(
    ("data", "code"),
    [(ds(10, 5, 1), "features"), (ds(10, 4, 3), "labels"), (Dataset.none(), "empty")],
)
def test_a_dataset_that_cannot_train_the_job_says_why(data: Dataset, code: str) -> None:
    with pytest.raises(DataError) as e:
        check_dataset(data, n_features=4, n_classes=2)
    assert e.value.code == code
    reason = data_abort_reason(e.value)
    assert reason.startswith(f"data_{code}: ") and abort_code(reason) == f"data_{code}"
    check_dataset(ds(10, 4, 1), n_features=4, n_classes=2)  # fits: no error


def test_unusable_files_are_typed_data_errors(tmp_path: Path) -> None:
    nan = tmp_path / "nan.csv"
    nan.write_text("a,b,label\n1,2,0\nnan,1,1\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for path, code in [(nan, "non_finite"), (empty, "empty")]:
        with pytest.raises(DataError) as e:
            load_dataset(path)
        assert e.value.code == code


def test_abort_codes_are_bounded() -> None:
    assert abort_code("deadline") == "deadline"
    assert abort_code("error:IndexError") == "error"
    assert abort_code("Évil label {x}") == "other"
    assert abort_code("x" * 300) == "other"


@pytest.mark.integration
async def test_data_aborts_are_counted_held_and_fail_the_job(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        fail_after_aborts=3
    )
    m = CoordinatorMetrics(registry=CollectorRegistry())
    ids = [f"{unique_prefix.strip('.')}-d{i}" for i in range(4)]
    body = {"model_name": f"{unique_prefix}m", "shards": 1, "concurrency": 2,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 2}}  # fmt: skip
    reason = "data_features: data has 5 features, the job's model takes 4"
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s, metrics=m))
        devs = [await ex.enter_async_context(Device(i, s.mqtt_host, s.mqtt_port)) for i in ids]
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        await online(coord, devs)
        r = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]

        done: set[str] = set()

        async def abort_all_tasks() -> set[str]:
            """Every device aborts every task it was given; returns the aborting devices."""
            seen: set[str] = set()
            for d in devs:
                for t in d.got("task", Task):
                    if t.task_id not in done:
                        await d.send("task_status", TaskResponse(
                            task_id=t.task_id, device_id=d.id, status="aborted",
                            reason=reason, ts=time.time()))  # fmt: skip
                        done.add(t.task_id)
                        seen.add(d.id)
            return seen

        aborted: set[str] = set()

        async def failed() -> dict[str, Any] | None:
            aborted.update(await abort_all_tasks())
            j = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["status"] == "failed" else None

        job = await eventually(failed, timeout=60)
        assert job["status_reason"] == reason
        assert job["aborts"]["data_features"] >= 3
        assert counter_value(m.task_aborts, job=jid, reason="data_features") >= 3
        text = (await http.get("/metrics")).text
        assert f'fedfleet_coord_task_aborts_total{{job="{jid}",reason="data_features"}}' in text
        # each aborting device was held off the job: one task each, never re-issued
        for d in devs:
            assert len(d.got("task", Task)) <= 1, d.id
        hist = await coord.fleet.history(next(iter(aborted)))
        assert hist[0]["outcome"] == "aborted:data_features"
        # a failed job issues nothing more
        n = sum(len(d.got("task", Task)) for d in devs)
        await coord.selector.locked_pass()
        assert sum(len(d.got("task", Task)) for d in devs) == n
        assert (await http.get(f"/v1/jobs/{jid}")).json()["status"] == "failed"
