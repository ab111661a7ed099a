"""Bad device data through the real agent (the ``fedfleet agent --data`` path) and the real
coordinator on the test stack (issue "Jobs that run themselves", done-when): a wrong
feature count, a label outside the job's classes, NaN rows and an empty file each end the
job ``failed`` with a visible reason (REST, ``fedfleet job status``, ``/metrics``), with no
device traceback and no re-issue storm (one task per device); a ``standardize`` job finds
a foreign label in its statistics phase, before any training task."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics
from coordinator.service import Coordinator
from edge_agent.agent import EdgeAgent
from edge_agent.cli import build_agent
from edge_agent.settings import AgentSettings
from fedfleet.job_cli import status_lines
from tests.csv_fleet import until
from tests.test_coordinator_integration import AUTH, coordinator_settings

pytestmark = pytest.mark.integration
DEVICES = 4
GOOD_ROW = "0.1,0.2,0.3,0.4,{label}"

CASES: dict[str, tuple[str, str]] = {  # case -> (file text, the abort code it must show)
    "features": ("a,b,c,d,e,label\n" + "0.1,0.2,0.3,0.4,0.5,1\n" * 6, "data_features"),
    # label 3 of a 3-class job in more rows than a device holds out (holdout_size(8, 0.2)
    # rows, chosen by device id): with only two such rows both were held out now and then,
    # that device trained cleanly, its accepted update meant the job could not fail
    "labels": ("a,b,c,d,label\n" + "".join(f"{GOOD_ROW.format(label=v)}\n"
                                            for v in (0, 3, 1, 3, 2, 3, 0, 1)), "data_labels"),
    "nan": ("a,b,c,d,label\n" + "0.1,nan,0.3,0.4,1\n" * 6, "data_non_finite"),
    "empty": ("", "data_empty"),
}


def _agents(tmp: Path, coord: Coordinator, text: str, tag: str) -> list[EdgeAgent]:
    out = []
    for i in range(DEVICES):
        path = tmp / f"{tag}{i}.csv"
        path.write_text(text)
        s = AgentSettings(
            device_id=f"{coord.settings.topic_prefix.strip('.')}-{tag}-{i}",
            mqtt_host=coord.settings.mqtt_host, mqtt_port=coord.settings.mqtt_port,
            api_url=coord.rest_url, telemetry_interval_s=0.5, inference=False,
            data_path=path, seed=i,
        )  # fmt: skip
        out.append(build_agent(s, probe_kind="linux"))  # this machine: mains power, ethernet
    return out


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info and r.name.startswith(("edge_agent",
                                                                           "coordinator"))]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


async def _job(http: httpx.AsyncClient, name: str, **extra: Any) -> str:
    body = {"model_name": name, "shards": 1, "concurrency": DEVICES,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 3},
            "evaluation": {"devices": 0}, **extra}  # fmt: skip
    r = await http.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return str(r.json()["job_id"])


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_data_is_a_visible_job_failure_not_a_storm(
    case: str, stack: Any, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    text, code = CASES[case]
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        fail_after_aborts=3
    )
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s, metrics=metrics))
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        jid = await _job(http, f"{unique_prefix}m")
        agents = _agents(tmp_path, coord, text, case)
        for a in agents:
            await ex.enter_async_context(a)

        async def failed() -> dict[str, Any] | None:
            j: dict[str, Any] = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["status"] == "failed" else None

        job = await until(failed, 120.0)
        assert job["status_reason"].startswith(code), job["status_reason"]
        assert job["aborts"][code] >= 3
        ev = (await http.get(f"/v1/jobs/{jid}/metrics")).json()
        shown = "\n".join(status_lines(job, ev))  # what `fedfleet job status` prints
        assert "failed" in shown and code in shown, shown
        text_metrics = (await http.get("/metrics")).text
        assert f'fedfleet_coord_task_aborts_total{{job="{jid}",reason="{code}"}}' in text_metrics
        # no storm: a device that aborted for its data is held off the job
        assert all(a.stats.tasks_received <= 1 for a in agents), [
            a.stats.tasks_received for a in agents]  # fmt: skip
        assert job["stats"].get("tasks_issued", 0) <= DEVICES
    _no_tracebacks(caplog)


async def test_a_standardize_job_fails_on_a_foreign_label_before_training(
    stack: Any, unique_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        stats_min_reports=DEVICES
    )
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s))
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        jid = await _job(http, f"{unique_prefix}m", standardize=True)
        for a in _agents(tmp_path, coord, CASES["labels"][0], "std"):
            await ex.enter_async_context(a)

        async def failed() -> dict[str, Any] | None:
            j: dict[str, Any] = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["status"] == "failed" else None

        job = await until(failed, 120.0)
        assert job["status_reason"].startswith("data_labels"), job["status_reason"]
        assert "'3'" in job["status_reason"], job["status_reason"]
        assert job["stats"].get("tasks_issued", 0) == 0  # not one training task
        assert job["stats"].get("tasks_stats_issued", 0) >= 1
    _no_tracebacks(caplog)
