"""A Redis that comes back empty: the coordinator restores every job from the job journal
(Kafka) within seconds, never re-initialises a model, refuses uploads of tasks Redis lost
with a reason the agent handles, and issues new tasks (real Kafka, Mosquitto, and a
redis-server of the test's own that is ``kill -9``-ed and its data wiped)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from schemas.messages import Task, UploadAck
from stack.redis import RedisServer, redis_binary
from tests.test_coordinator_integration import Device, coordinator_settings, eventually
from tests.test_sync_rounds import first, online, update_for

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer adm"}


def kill9(srv: RedisServer) -> None:
    assert srv.proc is not None and srv.proc.pid is not None
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.proc.wait(timeout=10)  # type: ignore[union-attr]


async def test_redis_lost_everything_and_the_job_is_back_within_seconds(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    if redis_binary() is None:
        pytest.skip("no redis-server")
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    await asyncio.to_thread(srv.wait_ready)
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        redis_url=srv.url, recovery_check_s=0.5
    )
    m = CoordinatorMetrics(registry=CollectorRegistry())
    dev_id = f"{unique_prefix.strip('.')}-d0"
    name = f"{unique_prefix}m"
    body: dict[str, Any] = {"model_name": name, "shards": 2, "concurrency": 1,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 2}}  # fmt: skip
    try:
        async with AsyncExitStack() as ex:
            coord = await ex.enter_async_context(Coordinator(s, metrics=m))
            dev = await ex.enter_async_context(Device(dev_id, s.mqtt_host, s.mqtt_port))
            http = await ex.enter_async_context(httpx.AsyncClient(base_url=coord.rest_url))
            await online(coord, [dev])
            r = await http.post("/v1/jobs", json=body, headers=AUTH)
            assert r.status_code == 201, r.text
            job = r.json()
            jid, bounds = job["job_id"], job["shard_bounds"]
            (t1,) = await first(dev, "task", Task)
            v0 = coord.registry.newest_version(name)

            kill9(srv)  # and its disk is gone too: it comes back empty
            shutil.rmtree(srv.workdir, ignore_errors=True)
            srv.workdir.mkdir(parents=True)
            down = await http.get(f"/v1/jobs/{jid}")
            assert down.status_code == 503 and "detail" in down.json()
            assert down.headers.get("retry-after")
            srv.start()
            await asyncio.to_thread(srv.wait_ready)
            t_up = time.monotonic()

            async def back() -> dict[str, Any] | None:
                g = await http.get(f"/v1/jobs/{jid}")
                return g.json() if g.status_code == 200 else None

            got = await eventually(back, timeout=30)
            assert time.monotonic() - t_up < 10.0  # back within 10 s of Redis coming up
            assert got["status"] == "running" and got["shard_bounds"] == bounds
            assert counter_value(m.jobs_restored) >= 1
            # re-creating it never resets its model; nor may a second job take the name
            again = await http.post("/v1/jobs", json={**body, "job_id": jid}, headers=AUTH)
            assert again.status_code == 409, again.text
            other = await http.post("/v1/jobs", json=body, headers=AUTH)
            assert other.status_code == 409 and "running job" in other.json()["detail"]
            assert coord.registry.newest_version(name) == v0

            # the device's task vanished with Redis: its late upload is refused with a
            # reason (the agent's outbox drops it), and once it reports again it is given
            # a new task
            await dev.send("update", update_for(t1, bounds))
            (ack,) = await first(dev, "ack", UploadAck)
            assert (ack.status, ack.reason) == ("rejected", "unknown_task")
            await dev.hello()

            async def second_task() -> list[Task] | None:
                ts = dev.got("task", Task)
                return ts if len(ts) >= 2 else None

            tasks = await eventually(second_task, timeout=30)
            assert tasks[1].task_id != t1.task_id and tasks[1].job_id == jid
            # stopping is recorded too: after another loss the job comes back stopped
            assert (await http.post(f"/v1/jobs/{jid}/stop", headers=AUTH)).status_code == 200
            kill9(srv)
            shutil.rmtree(srv.workdir, ignore_errors=True)
            srv.workdir.mkdir(parents=True)
            srv.start()
            await asyncio.to_thread(srv.wait_ready)

            async def stopped() -> bool:
                g = await http.get(f"/v1/jobs/{jid}")
                return g.status_code == 200 and g.json()["status"] == "stopped"

            await eventually(stopped, timeout=30)
    finally:
        srv.stop()
