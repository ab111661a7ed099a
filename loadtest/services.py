"""Server side of a load test: the coordinator and aggregator processes (with metrics
ports), jobs over REST, aggregator metrics, and the coordinator's Redis state."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fedfleet.errors import StackError
from fedfleet.procs_services import ServiceSet
from fedfleet.stack.procs import ManagedProcess, free_port


class LoadServices(ServiceSet):
    """``ServiceSet`` whose aggregators serve Prometheus metrics on free ports."""

    def __init__(self, *args: Any, aggregator_args: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.aggregator_args = aggregator_args
        self.metrics_ports: list[int] = []

    def start_aggregator(self, i: int) -> ManagedProcess:
        port = free_port()
        self.metrics_ports.append(port)
        argv = [
            sys.executable, "-m", "fedfleet", "aggregator",
            "--kafka", self.info.kafka_bootstrap,
            "--topic-prefix", self.topic_prefix,
            "--checkpoint-dir", str(self.workdir / "checkpoints"),
            "--client-id", f"agg-{i}",
            "--history-size", "256",
            "--metrics-port", str(port),
            *self.aggregator_args,
        ]  # fmt: skip
        p = ManagedProcess(
            f"aggregator-{i}", argv, log_path=self.workdir / f"aggregator-{i}.log", env=self._env()
        )
        p.start()
        return p

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.coordinator is not None and self.coordinator.pid:
            out["coordinator"] = self.coordinator.pid
        for p in self.aggregators:
            if p.pid:
                out[p.name] = p.pid
        return out

    @property
    def redis_prefix(self) -> str:
        return f"ff:{self.topic_prefix}"


@dataclass
class AggMetrics:
    """Summed counters of all aggregator workers at one instant."""

    applied_by_shard: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, float] = field(default_factory=dict)
    staleness_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative
    published: float = 0.0
    t: float = 0.0

    @property
    def applied(self) -> float:
        return sum(self.applied_by_shard.values())

    def minus(self, other: AggMetrics) -> AggMetrics:
        def d(a: dict[Any, float], b: dict[Any, float]) -> dict[Any, float]:
            return {k: v - b.get(k, 0.0) for k, v in a.items()}

        return AggMetrics(
            d(self.applied_by_shard, other.applied_by_shard), d(self.rejected, other.rejected),
            d(self.staleness_buckets, other.staleness_buckets),
            self.published - other.published, self.t,
        )  # fmt: skip

    def staleness_hist(self) -> list[tuple[str, int]]:
        """Per-bucket (not cumulative) counts, labelled ``le``."""
        out, prev = [], 0.0
        for le in sorted(self.staleness_buckets):
            c = self.staleness_buckets[le]
            label = "+Inf" if le == float("inf") else f"{le:g}"
            out.append((label, round(c - prev)))
            prev = c
        return out


async def scrape(http: httpx.AsyncClient, ports: list[int]) -> AggMetrics:
    m = AggMetrics(t=time.monotonic())
    for port in ports:
        try:
            r = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
        except httpx.HTTPError:
            continue
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                if s.name == "fedfleet_aggregator_updates_applied_total":
                    k = s.labels.get("shard", "?")
                    m.applied_by_shard[k] = m.applied_by_shard.get(k, 0.0) + s.value
                elif s.name == "fedfleet_aggregator_updates_rejected_total":
                    k = s.labels.get("reason", "?")
                    m.rejected[k] = m.rejected.get(k, 0.0) + s.value
                elif s.name == "fedfleet_aggregator_staleness_bucket":
                    le = float(s.labels["le"])
                    m.staleness_buckets[le] = m.staleness_buckets.get(le, 0.0) + s.value
                elif s.name == "fedfleet_aggregator_versions_published_total":
                    m.published += s.value
    return m


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
