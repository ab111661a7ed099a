"""A fleet spread over several processes (``sim.worker``), driven from the parent.

One core runs a few thousand idle agents; past that the fleet is cut into contiguous
slices, one per process. The parent reads each worker's report lines and sums them.
``device_mode="lean"`` runs wire-level devices instead of agents (``sim.lean_fleet``):
many thousands per process, at most ``MAX_PER_PROCESS`` (more processes are used if the
fleet needs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from edge_agent.credentials import DeviceCredential
from sim.fleet import FleetSpec
from sim.lean_fleet import MAX_PER_PROCESS

DEVICE_MODES = ("agent", "lean")

_SUM_KEYS = ("connected", "busy", "rss_mb", "affected")


class _Worker:
    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.last: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.last = msg
            if msg.get("final"):
                self.final = msg

    async def send(self, obj: dict[str, Any]) -> None:
        if self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()


class FleetPool:
    """``processes`` worker processes sharing ``spec.devices`` devices."""

    def __init__(
        self,
        spec: FleetSpec,
        *,
        processes: int,
        mqtt_host: str,
        mqtt_port: int,
        api_url: str,
        public_key_hex: str = "",
        log_dir: Path,
        report_s: float = 1.0,
        credentials: Mapping[str, DeviceCredential] | None = None,
        ca_file: Path | None = None,
        device_mode: str = "agent",
        brokers: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``credentials``/``ca_file``: a secure stack's enrolled fleet (``sim.enrol``); each
        worker gets only its slice's credentials, over its stdin (never argv or a file).
        ``device_mode``: ``agent`` (real ``EdgeAgent``s) or ``lean`` (``sim.lean``).
        ``brokers``: every broker of the fleet in the deployment's order (lean devices
        only); each device dials the one ``schemas.brokers.failover_order`` gives it."""
        if device_mode not in DEVICE_MODES:
            raise ValueError(f"device_mode must be one of {', '.join(DEVICE_MODES)}")
        if len(brokers) > 1 and device_mode != "lean":
            raise ValueError("several brokers: lean devices only (the simulated agents of "
                             "sim.fleet dial mqtt_host:mqtt_port)")  # fmt: skip
        self.brokers = [(h, int(p)) for h, p in brokers] or [(mqtt_host, mqtt_port)]
        self.spec = spec
        self.credentials = credentials
        self.ca_file = ca_file
        self.device_mode = device_mode
        if device_mode == "lean":  # each connection is a file: a process opens 20,000
            processes = max(processes, -(-spec.devices // MAX_PER_PROCESS))
        self.processes = max(1, min(processes, spec.devices))
        self.cfg = {"mqtt_host": mqtt_host, "mqtt_port": mqtt_port, "api_url": api_url,
                    "public_key_hex": public_key_hex, "report_s": report_s,
                    "device_mode": device_mode, "brokers": self.brokers}  # fmt: skip
        self.log_dir = log_dir
        self.workers: list[_Worker] = []

    def slices(self) -> list[FleetSpec]:
        n, k = self.spec.devices, self.processes
        out, first = [], 0
        for i in range(k):
            size = n // k + (1 if i < n % k else 0)
            # Each slice paces its own connects: the whole fleet connects at connect_per_s.
            out.append(replace(self.spec, devices=size, first=first, total=n,
                               connect_per_s=self.spec.connect_per_s / k))  # fmt: skip
            first += size
        return out

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i, sl in enumerate(self.slices()):
            err = open(self.log_dir / f"fleet-{i}.log", "ab")  # noqa: ASYNC230
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sim.worker",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=err, env=env, limit=1 << 24,
                )  # fmt: skip
            finally:
                err.close()
            w = _Worker(i, proc)
            w.reader = asyncio.create_task(w.read())
            self.workers.append(w)
            cfg: dict[str, Any] = {**self.cfg, "spec": asdict(sl)}
            if self.credentials is not None:
                cfg["credentials"] = {d: asdict(self.credentials[d]) for d in sl.device_ids()}
                cfg["ca_file"] = str(self.ca_file) if self.ca_file else ""
            await w.send(cfg)

    async def __aenter__(self) -> FleetPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def alive(self) -> bool:
        return all(w.proc.returncode is None for w in self.workers)

    def snapshot(self) -> dict[str, Any]:
        """Sum of the workers' latest reports."""
        out: dict[str, Any] = dict.fromkeys(_SUM_KEYS, 0)
        stats: dict[str, float] = {}
        churn: dict[str, int] = {}
        for w in self.workers:
            msg = w.final or w.last
            for k in _SUM_KEYS:
                out[k] += msg.get(k, 0)
            for k, v in msg.get("stats", {}).items():
                if isinstance(v, int | float):
                    stats[k] = stats.get(k, 0) + v
            for k, v in msg.get("churn", {}).items():
                churn[k] = churn.get(k, 0) + int(v)
        out["stats"] = stats
        per = [0] * len(self.brokers)
        for w in self.workers:
            for i, v in enumerate((w.final or w.last).get("per_broker", [])[: len(per)]):
                per[i] += int(v)
        out["per_broker"] = per
        out["loop_lag_p99_s"] = max(
            (w.last.get("loop_lag_p99_s", 0.0) for w in self.workers), default=0.0
        )
        out["churn"] = churn
        return out

    def acked_ids(self) -> set[str]:
        ids: set[str] = set()
        for w in self.workers:
            if w.final is not None:
                ids.update(w.final.get("acked_ids", []))
        return ids

    async def broadcast(self, obj: dict[str, Any]) -> None:
        for w in self.workers:
            await w.send(obj)

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask every worker to stop its agents cleanly, then collect final reports."""
        await self.broadcast({"cmd": "stop"})
        for w in self.workers:
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in self.workers:
            try:
                await asyncio.wait_for(w.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.reader, 5.0)
