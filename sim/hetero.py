"""Heterogeneity models of the fleet simulator (documented in ``docs/loadtest.md``).

* compute speed: lognormal(0, sigma) per device (FedScale, Papaya), drawn by the fleet;
* bandwidth per network type: ``NETWORK_KBPS`` means, uniform ×[0.3, 1.5) per device
  (``SimulatedProbe``); model download and update upload take ``bytes / bandwidth`` of
  simulated time (``SimAgent``);
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
from typing import Any

from edge_agent.agent import EdgeAgent
from edge_agent.models import VerifiedModel
from edge_agent.probe import SimulatedProbe

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
        self._t0 = self._clock()
        self._start_hour = start_hour
        self._base_plug = self.plug_rate_per_h
        self._base_unplug = self.unplug_rate_per_h

    def sim_hour(self) -> float:
        elapsed_h = (self._clock() - self._t0) * self.time_scale / 3600.0
        return (self._start_hour + elapsed_h) % 24.0

    def _advance(self) -> None:
        f = diurnal_plug_factor(self.sim_hour()) if self.diurnal else 1.0
        self.plug_rate_per_h = self._base_plug * f
        self.unplug_rate_per_h = self._base_unplug * (6.0 / (1.0 + f))
        super()._advance()


def transfer_delay(n_bytes: int, kbps: float, time_scale: float) -> float:
    """Real seconds to move ``n_bytes`` at ``kbps`` (simulated time compressed)."""
    if n_bytes <= 0 or time_scale <= 0:
        return 0.0
    sim_s = n_bytes * 8.0 / 1000.0 / max(kbps, 1.0)
    return sim_s / time_scale


class SimAgent(EdgeAgent):
    """The real ``EdgeAgent`` plus simulated transfer time for model pulls and uploads.

    The delays use the probe's current bandwidth; the transfer itself is the real one
    (REST pull, MQTT publish) on loopback.
    """

    time_scale: float = 1.0
    update_bytes: int = 0  # payload bytes of update publishes (incl. re-sends)

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        ok = await super()._publish(topic, payload, qos, retain)
        if ok and topic.endswith("/update"):
            self.update_bytes += len(payload)
        return ok

    def _kbps(self) -> float:
        return float(self.probe.read().bandwidth_kbps)

    async def _pull(self, name: str, *, abort: bool = False) -> VerifiedModel:
        model = await super()._pull(name, abort=abort)
        delay = transfer_delay(int(model.params.nbytes), self._kbps(), self.time_scale)
        if delay > 0:
            await asyncio.sleep(delay)
        return model

    async def _resend_one(self, update_id: str, data: bytes | None = None) -> None:
        if data is not None:
            delay = transfer_delay(len(data), self._kbps(), self.time_scale)
            if delay > 0:
                await asyncio.sleep(delay)
        await super()._resend_one(update_id, data)
