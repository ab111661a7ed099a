"""Service processes the demo and load tests launch: the coordinator and aggregator shards,
as real `fedfleet` subprocesses tied to the parent's life."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.credentials import https_verify
from stack import StackInfo
from stack.errors import StackError
from stack.procs import ManagedProcess, free_port


class ServiceSet:
    """One coordinator and N aggregator workers on a running stack."""

    def __init__(
        self,
        info: StackInfo,
        workdir: Path,
        *,
        aggregators: int = 2,
        admin_token: str = "demo-admin-token",
        topic_prefix: str = "fl.",
        coordinator_args: tuple[str, ...] = (),
        aggregator_args: tuple[str, ...] = (),
        aggregator_history_size: int = 128,
    ) -> None:
        self.info = info
        self.workdir = workdir
        self.n_aggregators = aggregators
        self.admin_token = admin_token
        self.topic_prefix = topic_prefix
        self.coordinator_args = coordinator_args
        self.aggregator_args = aggregator_args
        self.aggregator_history_size = aggregator_history_size
        self.http_port = free_port()
        self.coordinator: ManagedProcess | None = None
        self.aggregators: list[ManagedProcess] = []
        self.aggregator_metrics_ports: list[int] = []

    @property
    def rest_url(self) -> str:
        scheme = "https" if self.info.tls_certfile else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client checks the coordinator's certificate against."""
        ca = Path(self.info.mqtt_cafile) if self.info.tls_certfile else None
        return https_verify(ca, "mqtt_cafile")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_coordinator(self) -> None:
        argv = [
            sys.executable, "-m", "fedfleet", "coordinator",
            *self.info.coordinator_args(),
            "--http-port", str(self.http_port),
            "--topic-prefix", self.topic_prefix,
            "--admin-token", self.admin_token,
            "--model-store-dir", str(self.workdir / "models"),
            "--signing-key-path", str(self.workdir / "keys" / "model-signing.ed25519"),
            "--task-key-path", str(self.workdir / "keys" / "task-token.key"),
            "--retention", "500",
            *self.coordinator_args,
        ]  # fmt: skip
        env = {**self._env(), **self.info.coordinator_env()}
        self.coordinator = ManagedProcess(
            "coordinator", argv, log_path=self.workdir / "coordinator.log", env=env
        )
        self.coordinator.start()

    def start_aggregator(self, i: int) -> ManagedProcess:
        port = free_port()
        if i < len(self.aggregator_metrics_ports):
            self.aggregator_metrics_ports[i] = port
        else:
            self.aggregator_metrics_ports.append(port)
        argv = [
            sys.executable, "-m", "fedfleet", "aggregator",
            *self.info.aggregator_args(),
            "--topic-prefix", self.topic_prefix,
            "--checkpoint-dir", str(self.workdir / "checkpoints"),
            "--client-id", f"agg-{i}",
            "--history-size", str(self.aggregator_history_size),
            "--metrics-port", str(port),
            *self.aggregator_args,
        ]  # fmt: skip
        p = ManagedProcess(
            f"aggregator-{i}", argv, log_path=self.workdir / f"aggregator-{i}.log", env=self._env()
        )
        p.start()
        return p

    async def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_coordinator()
        await self.wait_ready(timeout)
        for i in range(self.n_aggregators):
            self.aggregators.append(self.start_aggregator(i))

    async def wait_ready(self, timeout: float) -> None:
        assert self.coordinator is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0, verify=self.verify) as http:
            while time.monotonic() < deadline:
                if not self.coordinator.alive():
                    raise StackError(
                        "coordinator exited during start; log "
                        f"{self.coordinator.log_path}:\n{self.coordinator.log_tail()}"
                    )
                try:
                    r = await http.get(f"{self.rest_url}/readyz")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.3)
        raise StackError(f"coordinator not ready at {self.rest_url} after {timeout:.0f}s")

    async def aggregator_rejections(self) -> dict[str, float]:
        """Updates rejected by the aggregators, by reason (summed over their /metrics)."""
        async with httpx.AsyncClient(timeout=3.0, verify=self.verify) as http:
            return (await scrape(http, self.aggregator_metrics_ports)).rejected

    def check_alive(self) -> None:
        for p in [self.coordinator, *self.aggregators]:
            if p is not None and not p.alive():
                raise StackError(f"{p.name} exited; log {p.log_path}:\n{p.log_tail()}")

    def restart_aggregator(self, i: int) -> None:
        """Start aggregator ``i`` again (after it died or was killed); same log, new port."""
        old = self.aggregators[i]
        if old.alive():
            raise StackError(f"{old.name} is still running")
        if old.proc is not None:
            old.proc.wait(timeout=5.0)  # reap it
        self.aggregators[i] = self.start_aggregator(i)

    def stop_aggregators(self) -> None:
        """SIGTERM every aggregator: each writes its final checkpoints and exits."""
        for p in self.aggregators:
            p.stop(timeout=30.0)

    def stop(self) -> None:
        for p in self.aggregators:
            p.stop(timeout=10.0)
        if self.coordinator is not None:
            self.coordinator.stop(timeout=10.0)


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
