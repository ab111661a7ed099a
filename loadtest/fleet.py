"""A simulated fleet: N real `EdgeAgent`s in one process, each with its own MQTT session.

Heterogeneity comes from `edge_agent.probe.SimulatedProbe` (lognormal compute speed,
battery drain/charge, plug/unplug and network changes as Poisson events) and from a
non-IID Dirichlet split of the training data. `time_scale` compresses simulated time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from edge_agent.agent import EdgeAgent
from edge_agent.data import Dataset, partition_dirichlet
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FleetSpec:
    """The simulated population."""

    devices: int = 200
    seed: int = 0
    dirichlet_alpha: float = 0.5
    time_scale: float = 60.0  # simulated seconds per real second
    telemetry_interval_s: float = 2.0
    charging_share: float = 0.6  # devices plugged in at start
    cellular_share: float = 0.3  # share on (metered) cellular at start
    speed_sigma: float = 0.8  # lognormal sigma of compute speed
    base_samples_per_s: float = 40.0  # simulated sample-steps/s of a speed-1 device
    connect_per_s: float = 400.0  # connection rate (avoid a self-made connect storm)
    id_prefix: str = "dev"


class SimulatedFleet:
    """Owns the agents' lifecycles; ``async with`` starts them, leaving stops them all."""

    def __init__(
        self,
        spec: FleetSpec,
        train: Dataset,
        *,
        mqtt_host: str,
        mqtt_port: int,
        api_url: str,
        public_key_hex: str = "",
    ) -> None:
        self.spec = spec
        self.train = train
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.api_url = api_url
        self.public_key_hex = public_key_hex
        self.agents: list[EdgeAgent] = []
        self.probes: list[SimulatedProbe] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    def _build(self) -> None:
        s = self.spec
        rng = random.Random(s.seed)
        parts = partition_dirichlet(self.train.y, s.devices, s.dirichlet_alpha, seed=s.seed)
        for i, idx in enumerate(parts):
            network = "cellular" if rng.random() < s.cellular_share else "wifi"
            probe = SimulatedProbe(
                seed=s.seed * 100_003 + i,
                charging=rng.random() < s.charging_share,
                network=network,  # type: ignore[arg-type]
                compute_speed=rng.lognormvariate(0.0, s.speed_sigma),
                time_scale=s.time_scale,
                base_samples_per_s=s.base_samples_per_s,
            )
            settings = AgentSettings(
                device_id=f"{s.id_prefix}-{i:05d}",
                mqtt_host=self.mqtt_host,
                mqtt_port=self.mqtt_port,
                api_url=self.api_url,
                telemetry_interval_s=s.telemetry_interval_s,
                public_key_hex=self.public_key_hex,
                inference=False,
                seed=s.seed + i,
            )
            self.probes.append(probe)
            self.agents.append(EdgeAgent(settings, probe, self.train.subset(idx), http=self._http))

    async def _life(self, agent: EdgeAgent, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with agent:
                await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s stopped with an error", agent.settings.device_id)

    async def __aenter__(self) -> SimulatedFleet:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(limits=limits, timeout=30.0)
        self._build()
        gap = 1.0 / self.spec.connect_per_s
        self._tasks = [
            asyncio.create_task(self._life(a, i * gap), name=f"agent-{i}")
            for i, a in enumerate(self.agents)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def stats(self) -> dict[str, Any]:
        total: Counter[str] = Counter()
        participated = 0
        for a in self.agents:
            st = a.stats.as_dict() if hasattr(a.stats, "as_dict") else dict(vars(a.stats))
            for k, v in st.items():
                if isinstance(v, int | float):
                    total[k] += v
            if st.get("updates_acked", 0) > 0:
                participated += 1
        out: dict[str, Any] = dict(total)
        out["devices_participated"] = participated
        return out
