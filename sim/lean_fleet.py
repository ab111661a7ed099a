"""``LeanFleet``: one process's slice of a fleet as lean devices (``sim.lean``).

The counterpart of ``sim.fleet.SimulatedFleet`` for scale scenarios, with the same
observation surface for ``sim.worker`` (``connected()``, ``busy()``, ``stats()``,
``abort_network()``, ``affected``, ``churn_events``, ``acked``). Devices connect at
``spec.connect_per_s`` through the shared wheel, over TLS to the fleet CA with their
enrolled username/password when ``credentials`` are given (``sim.enrol``), plain TCP
otherwise; a lost session reconnects with the agent's backoff
(``edge_agent.execution.backoff_delay``, ``spec.reconnect_max_s``). Over several brokers
(``brokers``) each device dials its home broker (``schemas.brokers``), moves on to the
next of its failover order after a failed dial and starts from home again after a session
that was up ends; ``per_broker`` counts the sessions up on each broker.

Per-device traits are drawn from ``spec.seed`` and the device's index in the whole fleet
(network: ``cellular_share`` metered cellular, else wifi; ``charging_share`` plugged in;
bandwidth and RTT per network type as ``sim.hetero``), so a device is the same whichever
process runs it. One process holds at most ``MAX_PER_PROCESS`` devices: every connection
is a file descriptor, and a process may open 20,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.agent import agent_link_config
from edge_agent.credentials import DeviceCredential
from edge_agent.execution import backoff_delay
from edge_agent.link import LinkConfig
from edge_agent.settings import AgentSettings
from edge_agent.stats import AgentStats
from schemas import mqtt_auth
from schemas.aio import cancel_all
from schemas.brokers import failover_order
from schemas.messages import Network
from sim.fleet import FleetSpec
from sim.hetero import NETWORK_KBPS
from sim.lean import DIAL, STOPPED, UP, WAIT, LeanDevice
from sim.lean_wheel import Wheel

log = logging.getLogger(__name__)
MAX_PER_PROCESS = 15_000  # of the 20,000 open files a process may have; the rest: headroom
TICK_S = 0.2
DIAL_TIMEOUT_S = 15.0
RECONNECT_MIN_S = 0.5  # AgentSettings' default
_RTT_MS = {"wifi": 30.0, "ethernet": 10.0, "cellular": 80.0, "none": 0.0}


class LeanFleet:
    """``spec.devices`` lean devices in this process; ``async with`` connects them,
    leaving says goodbye and disconnects them all."""

    loop: asyncio.AbstractEventLoop  # set by start()
    wheel: Wheel[LeanDevice]

    def __init__(
        self, spec: FleetSpec, *, mqtt_host: str, mqtt_port: int,
        credentials: Mapping[str, DeviceCredential] | None = None, ca_file: Path | None = None,
        tick_s: float = TICK_S, brokers: Sequence[tuple[str, int]] = (),
    ) -> None:  # fmt: skip
        """``brokers``: every broker of the fleet, in the deployment's order (default: the
        one ``mqtt_host``:``mqtt_port``); each device dials its own by
        ``schemas.brokers.failover_order`` and fails over as the agent does."""
        if spec.devices > MAX_PER_PROCESS:
            raise ValueError(f"{spec.devices} lean devices in one process: at most "
                             f"{MAX_PER_PROCESS} (open-file limit)")  # fmt: skip
        if credentials is not None and ca_file is None:
            raise ValueError("credentials are sent over TLS only: give the fleet CA (ca_file)")
        self.spec = spec
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.brokers = list(brokers) or [(mqtt_host, mqtt_port)]
        self.per_broker = [0] * len(self.brokers)  # sessions up on each broker
        self.failovers = 0  # dials that moved a device on to the next broker
        self.credentials = credentials
        self.ca_file = ca_file
        self.tick_s = tick_s
        self.counters = AgentStats()
        self.rng = random.Random(spec.seed ^ 0x1EA4 ^ spec.first)
        self.interval_s = spec.telemetry_interval_s
        self.time_scale = spec.time_scale
        self.devices: list[LeanDevice] = []
        self.affected: set[int] = set()
        self.churn_events: dict[str, int] = {}
        self.acked: set[str] = set()  # lean devices never upload
        self._up = 0
        self._ssl: ssl.SSLContext | None = None
        self._dials: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._started = False
        self._gone: asyncio.Event | None = None
        self._closing = 0  # sessions still open while stopping

    # ----------------------------------------------------------------- Host (sim.lean)

    def session(self, device_id: str) -> tuple[LinkConfig, str, str]:
        s = self.spec
        cfg = agent_link_config(AgentSettings(
            device_id=device_id, mqtt_keepalive_s=s.keepalive_s, reconnect_max_s=s.reconnect_max_s,
        ))  # fmt: skip
        cred = self.credentials.get(device_id) if self.credentials is not None else None
        return cfg, (cred.username if cred else ""), (cred.password if cred else "")

    def up(self, dev: LeanDevice) -> None:
        self._up += 1
        self.per_broker[dev.broker] += 1
        self.counters.connects += 1

    def down(self, dev: LeanDevice, was_up: bool) -> None:
        if was_up:
            self._up -= 1
            self.per_broker[dev.broker] -= 1
            dev.cursor = 0  # a session that was up ended: try the home broker first again
        else:  # connected, but no session (no CONNACK, refused): the next broker
            self._next_broker(dev)
        if self._stopping:
            self._closing -= 1
            if self._gone is not None and self._closing <= 0:
                self._gone.set()
            return
        if dev.state == STOPPED:  # vanished: no reconnect (unless it comes back)
            self.counters.disconnects += 1
            return
        self.counters.disconnects += 1
        self._retry(dev)

    # ----------------------------------------------------------------- building, dialing

    def _next_broker(self, dev: LeanDevice) -> None:
        if len(dev.order) > 1:
            dev.cursor = (dev.cursor + 1) % len(dev.order)
            self.failovers += 1

    def _make(self, g: int) -> LeanDevice:
        s = self.spec
        rng = random.Random(s.seed * 1_000_003 + g)  # the same draws whichever process
        network: Network = "cellular" if rng.random() < s.cellular_share else "wifi"
        dev = LeanDevice(
            self, s.device_id(g), battery=rng.uniform(20.0, 100.0),
            charging=rng.random() < s.charging_share, network=network,
            bandwidth=NETWORK_KBPS[network] * rng.uniform(0.3, 1.5),
            rtt=_RTT_MS[network] * rng.uniform(0.5, 2.0), idle=rng.random() < 0.7,
        )  # fmt: skip
        if len(self.brokers) > 1:
            dev.order = tuple(failover_order(dev.device_id, len(self.brokers)))
        return dev

    def _fire(self, dev: LeanDevice, now: float) -> None:
        try:
            if dev.state == WAIT:
                self._dial(dev)
            else:
                dev.due(now)
        except Exception:  # one device's bug must not stop every device's clock
            log.exception("%s: timer failed", dev.device_id)
            self.counters.count_error("internal")

    def _dial(self, dev: LeanDevice) -> None:
        if self._stopping:
            return
        dev.state = DIAL
        t = self.loop.create_task(self._open(dev))
        self._dials.add(t)
        t.add_done_callback(self._dials.discard)

    async def _open(self, dev: LeanDevice) -> None:
        host, port = self.brokers[dev.broker]
        kw: dict[str, Any] = {}
        if self._ssl is not None:
            kw = {"ssl": self._ssl, "server_hostname": host}
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: dev, host, port, **kw), DIAL_TIMEOUT_S)  # fmt: skip
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if self._stopping:
                return
            self.counters.disconnects += 1
            self.counters.count_error("mqtt")
            log.debug("%s: connect to %s:%d failed: %s", dev.device_id, host, port, exc)
            dev.state = WAIT
            self._next_broker(dev)
            self._retry(dev)

    def _retry(self, dev: LeanDevice) -> None:
        delay = backoff_delay(dev.attempt, RECONNECT_MIN_S, self.spec.reconnect_max_s, self.rng)
        dev.attempt = min(dev.attempt + 1, 30)
        self.wheel.at(dev, self.loop.time() + delay)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.loop = asyncio.get_running_loop()
        if self.ca_file is not None:
            self._ssl = mqtt_auth.tls_context(self.ca_file)
        self.wheel = Wheel(self.loop, self.tick_s, self._fire)
        s = self.spec
        self.devices = [self._make(g) for g in range(s.first, s.first + s.devices)]
        gap = 1.0 / s.connect_per_s if s.connect_per_s > 0 else 0.0
        t0 = self.loop.time()
        for i, dev in enumerate(self.devices):
            self.wheel.at(dev, t0 + i * gap)
        self.wheel.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Farewell + DISCONNECT on every live session, abort the rest (idempotent)."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._gone = asyncio.Event()
        self.wheel.stop()
        await cancel_all(list(self._dials))
        self._closing = sum(1 for d in self.devices if d.transport is not None)
        for dev in self.devices:
            if dev.state == UP:
                cfg, _, _ = self.session(dev.device_id)
                bye = cfg.farewell() if cfg.farewell is not None else None
                dev.farewell((bye.topic, bye.payload, bye.qos, bye.retain) if bye else None)
            else:
                dev.state = STOPPED
                dev.abort()
        if self._closing > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), timeout)
        for dev in self.devices:  # a peer that never closed: drop it
            dev.abort()

    async def __aenter__(self) -> LeanFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- observation, faults

    def connected(self) -> int:
        return self._up

    def busy(self) -> int:
        return 0  # a lean device never trains

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.counters.as_dict()
        out["devices_participated"] = 0
        out["acked_unique"] = 0
        out["failovers"] = self.failovers
        return out

    def vanish(self, i: int, back_after_s: float = 0.0) -> bool:
        """Device ``i`` loses its connection without DISCONNECT (the broker publishes its
        will) and stays away, or reconnects after ``back_after_s`` (> 0)."""
        dev = self.devices[i]
        self.affected.add(i)
        dev.state = STOPPED
        cut = dev.abort()
        if back_after_s > 0:
            def back() -> None:
                if dev.state == STOPPED and not self._stopping:
                    dev.state = WAIT
                    self.wheel.at(dev, self.loop.time())

            self.loop.call_later(back_after_s, back)
        return cut

    def abort_network(self, share: float) -> int:
        """Reconnect storm: cut ``share`` of the live sessions at once (no DISCONNECT, so
        the broker publishes their wills); they reconnect with backoff."""
        n = 0
        for dev in self.devices:
            if dev.state == UP and self.rng.random() < share and dev.abort():
                n += 1
        return n
