"""Server side of a load test: the coordinator and aggregator processes (with metrics
ports), jobs over REST, aggregator metrics, and the coordinator's Redis state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from sim.services import AggMetrics, ServiceSet, scrape
from sim.tasks import Task
from stack.errors import StackError


class LoadServices(ServiceSet):
    """``ServiceSet`` plus what the load-test scenarios read: process ids, Redis prefix."""

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.coordinator is not None and self.coordinator.pid:
            out["coordinator"] = self.coordinator.pid
        for p in self.aggregators:
            if p.pid:
                out[p.name] = p.pid
        return out

    @property
    def metrics_ports(self) -> list[int]:
        return self.aggregator_metrics_ports

    @property
    def redis_prefix(self) -> str:
        """The coordinator's Redis key prefix for this run's topic prefix."""
        from coordinator.settings import CoordinatorSettings

        return CoordinatorSettings(topic_prefix=self.topic_prefix, http_port=0).key_prefix


class Api:
    """The coordinator's REST API, as an admin."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.admin = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> Any:
        r = await self.http.get(path)
        if r.status_code != 200:
            raise StackError(f"GET {path}: {r.status_code} {r.text[:200]}")
        return r.json()

    async def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post("/v1/jobs", json=body, headers=self.admin)
        if r.status_code >= 300:
            raise StackError(f"creating job failed: {r.status_code} {r.text[:300]}")
        out: dict[str, Any] = r.json()
        return out

    async def stop_job(self, job_id: str) -> None:
        await self.http.post(f"/v1/jobs/{job_id}/stop", headers=self.admin)

    async def public_key(self) -> str:
        return str((await self.get("/v1/keys/model-signing"))["public_key"])

    async def model_spec(self, task: Task) -> dict[str, Any]:
        """The job spec of ``task``'s model: its built-in spec, or its ONNX file uploaded
        (``POST /v1/artifacts``) and the spec that answers, with the task's extras."""
        if task.artifact is None:
            return dict(task.spec)
        r = await self.http.post("/v1/artifacts", content=task.artifact, headers=self.admin)
        if r.status_code != 201:
            raise StackError(f"uploading the model failed: {r.status_code} {r.text[:300]}")
        return {**r.json()["spec"], **task.spec}


async def wait_quiet(
    http: httpx.AsyncClient, ports: list[int], *, quiet_s: float, timeout_s: float
) -> AggMetrics:
    """Scrape until the aggregators' applied+rejected counts stop moving for ``quiet_s``."""
    start = last_change = time.monotonic()
    prev = -1.0
    while True:
        m = await scrape(http, ports)
        total = m.applied + sum(m.rejected.values())
        now = time.monotonic()
        if total != prev:
            prev, last_change = total, now
        if now - last_change >= quiet_s or now - start >= timeout_s:
            return m
        await asyncio.sleep(0.5)
