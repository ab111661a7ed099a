"""A simulated fleet: N real `EdgeAgent`s in one process, each with its own MQTT session.

Heterogeneity comes from `sim.hetero` (lognormal compute speed, bandwidth per network
type with simulated transfer time, diurnal charging) and `edge_agent.probe.SimulatedProbe`
(battery drain/charge, plug/unplug and network changes as Poisson events), and from a
non-IID Dirichlet split of the training data. `time_scale` compresses simulated time.
A fleet may be one slice (`first`, `devices`) of a larger fleet of `total` devices, so
several processes can share the work (`sim.pool`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from edge_agent.agent import EdgeAgent
from edge_agent.credentials import DeviceCredential, https_verify
from edge_agent.data import Dataset, partition_dirichlet
from edge_agent.settings import AgentSettings
from edge_agent.trainer_factory import make_trainer
from schemas.aio import cancel_all
from sim.byzantine import ATTACKS, Attack, AttackKind, ByzantineTrainer
from sim.hetero import DiurnalProbe, SimLink, sim_agent

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
    first: int = 0  # index of this slice's first device in the whole fleet
    total: int = 0  # devices in the whole fleet (0 = ``devices``)
    partition: bool = True  # False: every device gets the same small sample (scale tests)
    transfer: bool = True  # simulate download/upload time from bandwidth
    diurnal: bool = True  # plug-in rates follow the simulated hour of day
    keepalive_s: int = 60
    reconnect_max_s: float = 30.0
    dropout_share: float = 0.02  # share of the probe's network changes that go offline
    task: str = "digits"  # the rows a worker process loads (``sim.tasks.task_data``)
    # a share of the whole fleet uploads forged models (``sim.byzantine``; built-in
    # families only: an onnx job trains with the artifact's own trainer)
    byzantine_share: float = 0.0
    attack: str = "sign_flip"

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; one of {', '.join(ATTACKS)}")
        if not 0.0 <= self.byzantine_share < 1.0:
            raise ValueError(f"byzantine_share must be in [0, 1), got {self.byzantine_share}")

    def byzantine(self) -> frozenset[int]:
        """The indices (of the whole fleet) of the Byzantine devices: the first
        ``round(byzantine_share * total)`` of a permutation drawn from ``seed``, so every
        worker process and every run with the same seed picks the same ones."""
        total = self.total or self.devices
        k = round(self.byzantine_share * total)
        if k <= 0:
            return frozenset()
        order = np.random.default_rng([self.seed, 0xB7]).permutation(total)
        return frozenset(int(g) for g in order[:k])

    def device_id(self, g: int) -> str:
        """The id of device ``g`` of the whole fleet."""
        return f"{self.id_prefix}-{g:06d}"

    def device_ids(self) -> list[str]:
        """The ids of this slice's devices."""
        return [self.device_id(g) for g in range(self.first, self.first + self.devices)]


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
        credentials: Mapping[str, DeviceCredential] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """``credentials``: each device's own (``sim.enrol.enrol_fleet``), for a secure
        stack: TLS to the broker and HTTPS verified against ``ca_file``, the fleet CA."""
        self.spec = spec
        self.credentials = credentials
        self.ca_file = ca_file
        self.train = train
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.api_url = api_url
        self.public_key_hex = public_key_hex
        self.agents: list[EdgeAgent] = []
        self.probes: list[DiurnalProbe] = []
        self.links: list[SimLink] = []  # of every agent made (current and retired)
        self.acked: set[str] = set()  # update ids acked ``accepted`` or ``duplicate``
        self.affected: set[int] = set()  # devices dropped/flapped by churn
        self.churn_events: dict[str, int] = {"vanish": 0, "flap": 0, "vanish_busy": 0,
                                             "flap_busy": 0}  # fmt: skip
        self._tasks: list[asyncio.Task[None] | None] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._http: httpx.AsyncClient | None = None
        self._rng = random.Random(spec.seed ^ 0x5EED ^ spec.first)
        self._retired: list[EdgeAgent] = []
        self._byzantine = spec.byzantine()

    # ----------------------------------------------------------------- building

    def _parts(self) -> list[np.ndarray[Any, Any]]:
        s = self.spec
        total = s.total or s.devices
        if not s.partition:
            idx = np.arange(min(len(self.train), 32))
            return [idx] * s.devices
        parts = partition_dirichlet(self.train.y, total, s.dirichlet_alpha, seed=s.seed)
        return parts[s.first : s.first + s.devices]

    def _make(self, i: int, data: Dataset) -> EdgeAgent:
        s = self.spec
        g = s.first + i
        rng = random.Random(s.seed * 1_000_003 + g)
        network = "cellular" if rng.random() < s.cellular_share else "wifi"
        hour = rng.uniform(0.0, 24.0)  # devices live in different time zones
        probe = DiurnalProbe(
            seed=s.seed * 100_003 + g,
            start_hour=hour if s.diurnal else 12.0,  # no diurnal cycle: noon everywhere
            charging=rng.random() < s.charging_share,
            network=network,
            compute_speed=rng.lognormvariate(0.0, s.speed_sigma),
            time_scale=s.time_scale,
            base_samples_per_s=s.base_samples_per_s,
            dropout_share=s.dropout_share,
            diurnal=s.diurnal,
        )
        settings = AgentSettings(
            device_id=s.device_id(g),
            mqtt_host=self.mqtt_host,
            mqtt_port=self.mqtt_port,
            api_url=self.api_url,
            telemetry_interval_s=s.telemetry_interval_s,
            public_key_hex=self.public_key_hex,
            inference=False,
            seed=s.seed + g,
            mqtt_keepalive_s=s.keepalive_s,
            reconnect_max_s=s.reconnect_max_s,
            resend_interval_s=10.0,
        )
        if self.credentials is not None:
            cred = self.credentials[settings.device_id]
            settings = dataclasses.replace(
                settings, mqtt_username=cred.username, mqtt_password=cred.password,
                mqtt_cafile=self.ca_file, api_cafile=self.ca_file,
                public_key_hex=cred.model_signing_key,
            )  # fmt: skip
        trainer = None
        if g in self._byzantine:
            kind = cast(AttackKind, s.attack)
            trainer = ByzantineTrainer(make_trainer(settings.trainer), Attack(kind=kind))
        agent, link = sim_agent(
            settings, probe, data, http=self._http, trainer=trainer,
            time_scale=s.time_scale if s.transfer else 0.0,
        )  # fmt: skip
        self.links.append(link)
        agent.on_event = self._hook
        if i < len(self.probes):
            self.probes[i] = probe
        else:
            self.probes.append(probe)
        return agent

    def _hook(self, event: str, data: Any) -> None:
        if event in ("ack_accepted", "ack_duplicate") and isinstance(data, str):
            self.acked.add(data)

    def _build(self) -> None:
        for i, idx in enumerate(self._parts()):
            self.agents.append(self._make(i, self.train.subset(idx)))

    # ----------------------------------------------------------------- lifecycle

    async def _life(self, agent: EdgeAgent, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with agent:
                await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s stopped with an error", agent.settings.device_id)

    def _launch(self, i: int, delay: float) -> None:
        self._tasks[i] = asyncio.create_task(self._life(self.agents[i], delay), name=f"agent-{i}")

    async def __aenter__(self) -> SimulatedFleet:
        await self.start()
        return self

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        verify = https_verify(self.ca_file, "ca_file")
        self._http = httpx.AsyncClient(limits=limits, timeout=30.0, verify=verify)
        self._build()
        gap = 1.0 / self.spec.connect_per_s if self.spec.connect_per_s > 0 else 0.0
        self._tasks = [None] * len(self.agents)
        for i in range(len(self.agents)):
            self._launch(i, i * gap)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        tasks = [t for t in self._tasks if t is not None]
        await cancel_all([*tasks, *self._bg])
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ----------------------------------------------------------------- observation

    def connected(self) -> int:
        return sum(1 for a in self.agents if a.connected)

    def busy(self) -> int:
        return sum(1 for a in self.agents if a.busy)

    def stats(self) -> dict[str, Any]:
        total: dict[str, float] = {}
        participated = 0
        for a in [*self.agents, *self._retired]:
            st = a.stats.as_dict()
            for k, v in st.items():
                if isinstance(v, int | float):
                    total[k] = total.get(k, 0) + v
            if st.get("updates_acked", 0) > 0:
                participated += 1
        out: dict[str, Any] = dict(total)
        out["devices_participated"] = participated
        out["acked_unique"] = len(self.acked)
        return out

    # ----------------------------------------------------------------- faults

    @staticmethod
    def abort_socket(agent: EdgeAgent) -> bool:
        """Cut the agent's connection without an MQTT DISCONNECT (the broker then sends
        its last will), as a phone losing its radio would."""
        return agent.link.cut()

    def abort_network(self, share: float) -> int:
        """Reconnect storm: cut the connections of ``share`` of the agents at once."""
        n = 0
        for a in self.agents:
            if self._rng.random() < share and self.abort_socket(a):
                n += 1
        return n

    def vanish(self, i: int, back_after_s: float) -> None:
        """Device ``i`` dies (no clean shutdown, in-memory state lost) and a fresh agent
        with the same id comes back after ``back_after_s`` (0 = never)."""
        agent = self.agents[i]
        self.churn_events["vanish_busy" if agent.busy else "vanish"] += 1
        self.affected.add(i)
        self.abort_socket(agent)
        agent.probe.set(network="none")  # type: ignore[attr-defined]
        t = self._tasks[i]
        if t is not None:
            t.cancel()
        self._retired.append(agent)
        self.agents[i] = self._make(i, agent.dataset)
        self._tasks[i] = None
        if back_after_s > 0:
            self._launch(i, back_after_s)

    def flap(self, i: int, offline_s: float) -> None:
        """Device ``i`` loses its network for ``offline_s`` (a task in progress aborts with
        ``offline``; the abort cannot be delivered), then reconnects with its state."""
        agent = self.agents[i]
        self.churn_events["flap_busy" if agent.busy else "flap"] += 1
        self.affected.add(i)
        probe = self.probes[i]
        before = probe.read().network
        probe.set(network="none")
        self.abort_socket(agent)

        async def restore() -> None:
            await asyncio.sleep(offline_s)
            probe.set(network=before if before != "none" else "wifi")

        t = asyncio.create_task(restore())
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def churn(self, share: float, window_s: float, offline_s: float) -> None:
        """Over ``window_s``, drop ``share`` of the devices, busy ones first (mid-task);
        half vanish (come back fresh after ``offline_s``), half flap."""
        target = round(share * len(self.agents))
        if target <= 0:
            return
        ticks = max(1, int(window_s / 0.5))
        per_tick = max(1, -(-target // ticks))
        for _ in range(ticks):
            left = target - len(self.affected)
            if left <= 0:
                return
            fresh = [i for i in range(len(self.agents)) if i not in self.affected]
            busy = [i for i in fresh if self.agents[i].busy]
            self._rng.shuffle(busy)
            pick = busy[: min(per_tick, left)]
            if not pick and fresh:  # nobody training right now: flap idle ones
                pick = self._rng.sample(fresh, min(per_tick, left, len(fresh)))
            for i in pick:
                if self._rng.random() < 0.5:
                    self.vanish(i, offline_s)
                else:
                    self.flap(i, offline_s)
            await asyncio.sleep(0.5)
