"""Jobs that end by themselves: ``stop.max_updates`` (applied on every shard) and
``stop.max_wall_s``; the job ends ``completed`` with the condition as its reason, its
newest version is pinned, and no task is issued for it afterwards (real Kafka, Mosquitto,
Redis; shard versions are fed to the coordinator as the aggregators would send them)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.errors import JobError
from coordinator.jobs import build_job
from coordinator.policy import StopConfig, stop_reason
from coordinator.service import Coordinator
from schemas.messages import Task, encode
from tests.test_coordinator_integration import (
    Device,
    _shard_version,
    coordinator_settings,
    eventually,
)
from tests.test_sync_rounds import first, online

AUTH = {"Authorization": "Bearer adm"}


def test_stop_conditions_are_pure_and_validated() -> None:
    s = StopConfig(max_updates=10, max_wall_s=60)
    assert stop_reason(s, 9, 100.0, 159.0) is None
    assert (stop_reason(s, 10, 100.0, 101.0) or "").startswith("max_updates")
    assert (stop_reason(s, 0, 100.0, 160.0) or "").startswith("max_wall_s")
    assert stop_reason(StopConfig(), 10**9, 0.0, 1e12) is None  # no limits: never
    for bad in ({"max_updates": -1}, {"max_wall_s": "soon"}, {"until": 3}):
        with pytest.raises(JobError):
            StopConfig.from_dict(bad)
    body = {"model_name": "m", "spec": {"family": "softmax", "n_features": 2, "n_classes": 2},
            "stop": {"max_updates": 5}}  # fmt: skip
    assert build_job(body).stop == StopConfig(max_updates=5)


@pytest.mark.integration
@pytest.mark.parametrize("condition", ["max_updates", "max_wall_s"])
async def test_a_job_completes_on_its_stop_condition(
    stack: Any, unique_prefix: str, tmp_path: Path, condition: str
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    dev_id = f"{unique_prefix.strip('.')}-d0"
    stop = {"max_updates": 3} if condition == "max_updates" else {"max_wall_s": 3.0}
    name = f"{unique_prefix}m"
    body: dict[str, Any] = {
        "model_name": name, "shards": 2, "concurrency": 1, "stop": stop,
        "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
    }  # fmt: skip
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s))
        dev = await ex.enter_async_context(Device(dev_id, s.mqtt_host, s.mqtt_port))
        http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
        await online(coord, [dev])
        r = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]
        assert r.json()["stop"]["max_updates"] == stop.get("max_updates", 0)
        await first(dev, "task", Task)  # it trains until the condition holds
        job = await coord.jobs.get(jid)
        if condition == "max_updates":
            for v in (1, 2, 3):  # both shards announce 3 applied updates
                for sh in (0, 1):
                    await coord.apply_shard_version(encode(_shard_version(job.spec, sh, v)))

        async def completed() -> dict[str, Any] | None:
            j = (await http.get(f"/v1/jobs/{jid}")).json()
            return j if j["status"] == "completed" else None

        done = await eventually(completed, timeout=30)
        assert done["status_reason"].startswith(condition), done["status_reason"]
        assert coord.registry.pinned(name) == done["current_version"]  # final version pinned
        assert coord.registry.pinned(name) == coord.registry.newest_version(name)
        n = len(dev.got("task", Task))
        await dev.hello()
        await coord.selector.locked_pass()
        assert len(dev.got("task", Task)) == n  # nothing more is issued
