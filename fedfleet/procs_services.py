"""Service processes the demo and load tests launch: the coordinator and aggregator shards,
as real `fedfleet` subprocesses tied to the parent's life."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

from fedfleet.errors import StackError
from fedfleet.stack import StackInfo
from fedfleet.stack.procs import ManagedProcess, free_port


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
    ) -> None:
        self.info = info
        self.workdir = workdir
        self.n_aggregators = aggregators
        self.admin_token = admin_token
        self.topic_prefix = topic_prefix
        self.coordinator_args = coordinator_args
        self.http_port = free_port()
        self.coordinator: ManagedProcess | None = None
        self.aggregators: list[ManagedProcess] = []
        self.aggregator_metrics_ports: list[int] = []

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_coordinator(self) -> None:
        argv = [
            sys.executable, "-m", "fedfleet", "coordinator",
            "--kafka", self.info.kafka_bootstrap,
            "--mqtt", self.info.mqtt_url,
            "--redis", self.info.redis_url,
            "--http-port", str(self.http_port),
            "--topic-prefix", self.topic_prefix,
            "--admin-token", self.admin_token,
            "--model-store-dir", str(self.workdir / "models"),
            "--signing-key-path", str(self.workdir / "keys" / "model-signing.ed25519"),
            "--retention", "500",
            *self.coordinator_args,
        ]  # fmt: skip
        self.coordinator = ManagedProcess(
            "coordinator", argv, log_path=self.workdir / "coordinator.log", env=self._env()
        )
        self.coordinator.start()

    def start_aggregator(self, i: int) -> ManagedProcess:
        port = free_port()
        self.aggregator_metrics_ports.append(port)
        argv = [
            sys.executable, "-m", "fedfleet", "aggregator",
            "--kafka", self.info.kafka_bootstrap,
            "--topic-prefix", self.topic_prefix,
            "--checkpoint-dir", str(self.workdir / "checkpoints"),
            "--client-id", f"agg-{i}",
            "--history-size", "128",
            "--metrics-port", str(port),
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
        async with httpx.AsyncClient(timeout=2.0) as http:
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
        out: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=3.0) as http:
            for port in self.aggregator_metrics_ports:
                try:
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.HTTPError:
                    continue
                for line in text.splitlines():
                    if line.startswith("fedfleet_aggregator_updates_rejected_total{"):
                        labels, value = line.rsplit(" ", 1)
                        reason = labels.split('reason="', 1)[1].split('"', 1)[0]
                        out[reason] = out.get(reason, 0.0) + float(value)
        return out

    def check_alive(self) -> None:
        for p in [self.coordinator, *self.aggregators]:
            if p is not None and not p.alive():
                raise StackError(f"{p.name} exited; log {p.log_path}:\n{p.log_tail()}")

    def stop(self) -> None:
        for p in self.aggregators:
            p.stop(timeout=10.0)
        if self.coordinator is not None:
            self.coordinator.stop(timeout=10.0)
