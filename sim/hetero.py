"""Heterogeneity models of the fleet simulator (documented in ``docs/loadtest.md``).

* compute speed: lognormal(0, sigma) per device (FedScale, Papaya), drawn by the fleet;
  after real training the agent waits the probe's ``compute_delay`` (``SimulatedCompute``,
  the agent's injected ``ComputePacer``);
* bandwidth per network type: ``NETWORK_KBPS`` means, uniform ×[0.3, 1.5) per device
  (``SimulatedProbe``); model download and update upload take ``bytes / bandwidth`` of
  simulated time (``SimLink``, ``SimModels``: wrappers of the agent's link and model store);
* availability: a diurnal charging pattern (``DiurnalProbe``: people plug in overnight,
  unplug in the morning), plus the probe's Poisson plug/unplug and network changes (a share
  of them go to ``none`` = offline);
* battery: drain while idle / faster while training, charge while plugged (the probe);
* dropouts mid-task: injected by the fleet (``SimulatedFleet.vanish`` / ``flap``).

Time compression: ``time_scale`` simulated seconds pass per real second.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy.typing as npt

from edge_agent.agent import EdgeAgent, agent_rng, mqtt_link
from edge_agent.data import Dataset
from edge_agent.link import DeviceLink, LinkCallbacks, LinkConfig
from edge_agent.model_cache import ModelCache, ModelStore, manifest_for_stats, pull_for_eval
from edge_agent.models import VerifiedModel
from edge_agent.pacing import SimulatedCompute
from edge_agent.probe import DeviceProbe, SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.trainers import Trainer
from schemas.messages import ModelManifest
from schemas.types import F32

# Mean bandwidth (kbit/s) per network type; the probe draws each device ×U(0.3, 1.5).
NETWORK_KBPS = {"wifi": 20_000.0, "ethernet": 100_000.0, "cellular": 5_000.0, "none": 0.0}


def diurnal_plug_factor(hour: float) -> float:
    """Relative plug-in rate by simulated hour of day: high in the evening/night."""
    return 1.0 + 4.0 * max(0.0, math.cos((hour - 23.0) / 24.0 * 2 * math.pi))


class DiurnalProbe(SimulatedProbe):
    """``SimulatedProbe`` whose plug/unplug rates follow the simulated time of day.

    The simulated clock starts at ``start_hour`` and runs ``time_scale`` times faster than
    real time, so a simulated day takes ``86400 / time_scale`` real seconds.
    """

    def __init__(self, *, start_hour: float = 20.0, diurnal: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.diurnal = diurnal
        self._t0 = self.now()
        self._start_hour = start_hour
        self._base_plug = self.plug_rate_per_h
        self._base_unplug = self.unplug_rate_per_h

    def sim_hour(self) -> float:
        elapsed_h = (self.now() - self._t0) * self.time_scale / 3600.0
        return (self._start_hour + elapsed_h) % 24.0

    def before_advance(self) -> None:
        f = diurnal_plug_factor(self.sim_hour()) if self.diurnal else 1.0
        self.plug_rate_per_h = self._base_plug * f
        self.unplug_rate_per_h = self._base_unplug * (6.0 / (1.0 + f))


def transfer_delay(n_bytes: int, kbps: float, time_scale: float) -> float:
    """Real seconds to move ``n_bytes`` at ``kbps`` (simulated time compressed)."""
    if n_bytes <= 0 or time_scale <= 0:
        return 0.0
    sim_s = n_bytes * 8.0 / 1000.0 / max(kbps, 1.0)
    return sim_s / time_scale


class SimLink:
    """A ``DeviceLink`` wrapper: update publishes first wait their transfer time at the
    probe's current bandwidth and are counted (``update_bytes``, incl. re-sends); the
    transfer itself is the real one on the inner link."""

    def __init__(
        self, inner: DeviceLink, kbps: Callable[[], float], time_scale: float = 1.0
    ) -> None:
        self.inner = inner
        self.kbps = kbps
        self.time_scale = time_scale
        self.update_bytes = 0

    @property
    def config(self) -> LinkConfig:
        return self.inner.config

    def bind(self, callbacks: LinkCallbacks) -> None:
        self.inner.bind(callbacks)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def __aenter__(self) -> SimLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.inner.wait_connected(timeout)

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        update = topic.endswith("/update")
        if update:
            delay = transfer_delay(len(payload), self.kbps(), self.time_scale)
            if delay > 0:
                await asyncio.sleep(delay)
        ok = await self.inner.publish(topic, payload, qos, retain)
        if ok and update:
            self.update_bytes += len(payload)
        return ok

    def cut(self) -> bool:
        return self.inner.cut()


class SimModels:
    """A ``ModelStore`` wrapper: a model pull also waits its download time."""

    def __init__(
        self, inner: ModelStore, kbps: Callable[[], float], time_scale: float = 1.0
    ) -> None:
        self.inner = inner
        self.kbps = kbps
        self.time_scale = time_scale

    def open(self, http: httpx.AsyncClient) -> None:
        self.inner.open(http)

    async def pull(self, name: str) -> VerifiedModel:
        model = await self.inner.pull(name)
        delay = transfer_delay(int(model.params.nbytes), self.kbps(), self.time_scale)
        if delay > 0:
            await asyncio.sleep(delay)
        return model

    async def pull_version(self, name: str, version: int) -> VerifiedModel:
        """An ``eval`` task's model (``ScoringStore``), with its download time too."""
        model = await pull_for_eval(self.inner, name, version)
        delay = transfer_delay(int(model.params.nbytes), self.kbps(), self.time_scale)
        if delay > 0:
            await asyncio.sleep(delay)
        return model

    async def manifest(self, name: str) -> ModelManifest:
        return await manifest_for_stats(self.inner, name)

    async def refresh_onnx(self, name: str, version: int) -> int | None:
        return await self.inner.refresh_onnx(name, version)

    @property
    def version(self) -> int | None:
        return self.inner.version

    def predict(self, x: npt.ArrayLike) -> F32:
        return self.inner.predict(x)


def sim_agent(
    settings: AgentSettings,
    probe: DeviceProbe,
    dataset: Dataset,
    *,
    http: httpx.AsyncClient | None = None,
    time_scale: float = 1.0,
    link: DeviceLink | None = None,
    trainer: Trainer | None = None,
) -> tuple[EdgeAgent, SimLink]:
    """The real ``EdgeAgent`` with simulated transfer time (``time_scale`` 0: none) for
    model pulls and uploads, using the probe's current bandwidth, and simulated compute
    time (``SimulatedCompute``: the probe's ``compute_delay``); also its ``SimLink``.
    ``trainer`` replaces the built-in one (e.g. a ``sim.byzantine.ByzantineTrainer``)."""

    def kbps() -> float:
        return float(probe.read().bandwidth_kbps)

    rng = agent_rng(settings)  # one source for agent and link, as in a default agent
    sim_link = SimLink(link or mqtt_link(settings, rng), kbps, time_scale)
    models = SimModels(ModelCache(settings), kbps, time_scale)
    pacer = SimulatedCompute(probe)
    agent = EdgeAgent(
        settings, probe, dataset, http=http, rng=rng, link=sim_link, models=models, pacer=pacer,
        trainer=trainer,
    )
    return agent, sim_link
