"""Lean wire-level devices: thousands of real MQTT sessions per process, no agent inside.

A ``LeanDevice`` is one device's MQTT 3.1.1 session, written as an ``asyncio.Protocol``
on the codec of ``sim.lean_codec``: it speaks exactly what the real agent puts on the wire
(``edge_agent.agent.agent_link_config``: client id, persistent session, keep-alive,
subscriptions, the retained ``online`` status on connect, the retained ``offline``/``lost``
last will, the ``offline``/``shutdown`` farewell), with every payload built and encoded by
``schemas.messages``. It publishes ``Telemetry`` (QoS 0) every ``telemetry_interval_s``
(±10 % jitter, held back by ``Pace`` like the agent), sends a PINGREQ only when it has
been silent for 3/4 of the keep-alive and drops a session whose PINGRESP does not come,
and answers each ``Task`` the way the agent answers one it will not run: a
``TaskResponse(declined, reason)`` with the agent's own rules first (``no_token``,
``expired``, the resource gate ``edge_agent.gate.gate_reason``), else ``no_trainer``, so
the coordinator frees the slot at once instead of waiting for the lease. It never
trains or uploads: scale scenarios use it; training scenarios keep the real ``EdgeAgent``.

What makes it cheap (``bench/lean_device.py``; BENCHMARKS.md, "Lean devices"): no task,
future or timer per device. One ``Wheel`` per process (``sim.lean_wheel``: slots of
``tick_s``) wakes the devices that are due; one ``AgentStats`` holds the counters of the
whole process.
``sim.lean_fleet.LeanFleet`` owns the devices, dials them and reconnects them with the
agent's backoff, over several brokers as the agent does (``order``/``cursor``: its home
broker first, the next one of its failover order after a failed dial, home again after a
session that was up ends; ``schemas.brokers``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol, cast

from edge_agent.gate import gate_reason
from edge_agent.link import LinkConfig
from edge_agent.probe import ProbeReading
from edge_agent.settings import AGENT_VERSION
from edge_agent.stats import AgentStats
from schemas.errors import SchemaError
from schemas.messages import Network, Pace, Task, TaskResponse, Telemetry, decode, encode
from sim import lean_codec as mq
from sim.lean_wheel import Wheel

log = logging.getLogger(__name__)
LEAN_AGENT_VERSION = f"{AGENT_VERSION}+lean"  # what /v1/devices shows for a lean device
DECLINE_REASON = "no_trainer"  # a lean device never trains
MAX_PACE_S = 3600.0  # as the agent: a Pace holds telemetry back for at most an hour
WAIT, DIAL, HANDSHAKE, UP, STOPPED = range(5)  # LeanDevice.state


def decline_reason(task: Task, reading: ProbeReading, now: float) -> str:
    """Why a lean device declines ``task``: the agent's reasons where they apply
    (``edge_agent.agent.EdgeAgent._decline_reason``), else ``no_trainer``."""
    if not task.upload_token:
        return "no_token"
    if task.deadline_ts <= now:
        return "expired"
    gate = gate_reason(reading, min_battery=task.min_battery, allow_metered=task.allow_metered)
    return gate or DECLINE_REASON


class Host(Protocol):
    """What a device needs from the fleet that owns it (``sim.lean_fleet.LeanFleet``)."""

    loop: asyncio.AbstractEventLoop
    wheel: Wheel[LeanDevice]
    counters: AgentStats  # of the whole process
    rng: random.Random
    interval_s: float
    time_scale: float

    def session(self, device_id: str) -> tuple[LinkConfig, str, str]:
        """The device's session (the agent's) and its username/password ("" if none)."""

    def up(self, dev: LeanDevice) -> None: ...

    def down(self, dev: LeanDevice, was_up: bool) -> None: ...


class LeanDevice(asyncio.Protocol):
    """One device's MQTT session and telemetry state (see the module docstring)."""

    __slots__ = (
        "attempt", "bandwidth", "battery", "cfg", "charging", "cursor", "deadline", "device_id",
        "hello_pid", "host", "idle", "keepalive", "last_task", "last_tx", "metered", "network",
        "next_tel", "order", "pace_until", "pending", "pid", "ping_at", "prefix", "reader", "rtt",
        "seq", "slot", "state", "t_batt", "transport",
    )  # fmt: skip

    def __init__(self, host: Host, device_id: str, *, battery: float, charging: bool,
                 network: Network, bandwidth: float, rtt: float, idle: bool) -> None:  # fmt: skip
        self.host, self.device_id = host, device_id
        self.prefix = f"fleet/{device_id}/".encode()
        self.transport: asyncio.Transport | None = None
        self.reader = mq.PacketReader()
        self.state, self.slot, self.attempt, self.keepalive = WAIT, -1, 0, 60
        self.cfg: LinkConfig | None = None  # the session's, while the handshake runs
        self.pid, self.hello_pid = 0, -1
        self.pending: dict[int, tuple[bytes, bytes]] | None = None  # unacked task_status
        self.last_tx = self.ping_at = self.deadline = self.next_tel = self.pace_until = 0.0
        self.last_task, self.seq = "", 0
        self.battery, self.charging, self.network = battery, charging, network
        self.metered = network == "cellular"
        self.bandwidth, self.rtt, self.idle = bandwidth, rtt, idle
        self.t_batt = time.time()
        # the fleet's brokers in this device's failover order (schemas.brokers: home
        # first) and the position in it of the broker it dials or is connected to
        self.order: tuple[int, ...] = (0,)
        self.cursor = 0

    @property
    def broker(self) -> int:
        """The index (in the fleet's broker list) of the broker dialled or connected."""
        return self.order[self.cursor]

    # ----------------------------------------------------------------- the wire

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.last_tx = self.host.loop.time()

    def _next_pid(self) -> int:
        self.pid = self.pid % 0xFFFF + 1
        return self.pid

    def publish(self, leaf: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        pid = self._next_pid() if qos else 0
        self._write(mq.publish(self.prefix + leaf, payload, qos, packet_id=pid, retain=retain))
        self.host.counters.bytes_sent += len(payload)
        if qos and leaf == b"task_status":  # re-sent after a reconnect until acked
            if self.pending is None:
                self.pending = {}
            self.pending[pid] = (leaf, payload)

    def abort(self) -> bool:
        """Drop the TCP connection without DISCONNECT (the broker sends the will)."""
        if self.transport is None:
            return False
        self.transport.abort()
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods
        self.transport, self.reader = cast(asyncio.Transport, transport), mq.PacketReader()
        self.state, self.ping_at = HANDSHAKE, 0.0
        cfg, username, password = self.host.session(self.device_id)
        self.cfg = cfg
        self.keepalive = cfg.keepalive_s
        will = cfg.will() if cfg.will is not None else None
        self._write(mq.connect(
            cfg.client_id, keepalive=cfg.keepalive_s, clean_session=not cfg.persistent,
            username=username, password=password,
            will=(will.topic, will.payload, will.qos, will.retain) if will else None,
        ))  # fmt: skip
        self.deadline = self.host.loop.time() + max(10.0, cfg.keepalive_s / 2)
        self.host.wheel.at(self, self.deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        was_up = self.state == UP
        self.transport, self.cfg = None, None
        if self.state != STOPPED:
            self.state = WAIT
        self.host.down(self, was_up)

    def data_received(self, data: bytes) -> None:
        try:
            for kind, flags, body in self.reader.feed(data):
                if kind == mq.PUBLISH:
                    self._on_publish(flags, body)
                elif kind == mq.PUBACK:
                    self._on_puback(mq.decode_packet_id(body))
                elif kind == mq.PINGRESP:
                    self.ping_at = 0.0
                elif kind == mq.CONNACK:
                    self._on_connack(body)
                elif kind == mq.SUBACK:
                    if b"\x80" in mq.decode_suback(body)[1]:
                        self.host.counters.count_error("subscribe_refused")
        except mq.MqttProtocolError:
            self.host.counters.count_error("mqtt_protocol")
            self.abort()
        except Exception:  # a handler's bug: drop this session, never the process
            log.exception("%s: handler failed", self.device_id)
            self.host.counters.count_error("internal")
            self.abort()

    def _on_connack(self, body: bytes) -> None:
        _, rc = mq.decode_connack(body)
        if rc != 0:
            # 4/5: a wrong or revoked credential; as the agent, retry at the slowest pace
            self.host.counters.count_error("not_authorized" if rc in (4, 5) else "connack")
            self.attempt = 30 if rc in (4, 5) else self.attempt
            self.abort()
            return
        cfg = self.cfg or self.host.session(self.device_id)[0]
        self._write(mq.subscribe(self._next_pid(), cfg.subscriptions))
        if cfg.hello is not None:
            hello = cfg.hello()
            self.hello_pid = self._next_pid()
            self._write(mq.publish(hello.topic.encode(), hello.payload, hello.qos,
                                   packet_id=self.hello_pid, retain=hello.retain))  # fmt: skip
        for pid, (leaf, payload) in (self.pending or {}).items():  # QoS 1 still unacked
            self._write(mq.publish(self.prefix + leaf, payload, 1, packet_id=pid, dup=True))
        if cfg.hello is None:
            self._up()

    def _on_puback(self, pid: int) -> None:
        if pid == self.hello_pid and self.state == HANDSHAKE:
            self._up()
        elif self.pending is not None:
            self.pending.pop(pid, None)
            if not self.pending:
                self.pending = None

    def _up(self) -> None:
        self.state, self.attempt, self.cfg = UP, 0, None
        self.host.up(self)
        self.next_tel = self.host.loop.time()  # the agent reports at once on connect
        self.due(self.next_tel)

    def _on_publish(self, flags: int, body: bytes) -> None:
        topic, qos, pid, _, payload = mq.decode_publish(flags, body)
        if qos:
            self._write(mq.puback(pid))
        leaf = topic.rsplit("/", 1)[-1]
        if leaf == "task":
            self._on_task(payload)
        elif leaf == "pace":
            self._on_pace(payload)
        elif leaf == "ack":
            self.host.counters.acks_stale += 1  # a lean device has no outbox

    # ----------------------------------------------------------------- timers

    def due(self, now: float) -> None:
        """Woken by the wheel: send what is due and file the next wake-up."""
        if self.state == UP:
            if now >= self.next_tel:
                if now < self.pace_until:
                    self.next_tel = self.pace_until
                else:
                    self._telemetry()
                    self.next_tel = now + self.host.interval_s * self.host.rng.uniform(0.9, 1.1)
            ka = self.keepalive
            if self.ping_at and now - self.ping_at > ka:  # no PINGRESP: the broker is gone
                self.host.counters.count_error("keepalive")
                self.abort()
                return
            if not self.ping_at and now - self.last_tx >= 0.75 * ka:
                self._write(mq.PINGREQ_PACKET)
                self.ping_at = now
            watch = self.ping_at + ka + 0.01 if self.ping_at else self.last_tx + 0.75 * ka
            self.host.wheel.at(self, min(self.next_tel, watch))
        elif self.state == HANDSHAKE:
            if now >= self.deadline:
                self.host.counters.count_error("connack_timeout")
                self.abort()
            else:  # the wheel's slot began before the deadline: wake again at it
                self.host.wheel.at(self, self.deadline)

    # ----------------------------------------------------------------- messages

    def reading(self) -> ProbeReading:
        """The current simulated resources: battery drains 2 %/h, charges 40 %/h (per
        simulated hour), plugs in at 5 %, unplugs when full; network fixed."""
        now = time.time()
        hours = (now - self.t_batt) * self.host.time_scale / 3600.0
        self.t_batt = now
        if self.charging:
            self.battery = min(100.0, self.battery + 40.0 * hours)
            self.charging = self.battery < 100.0
        else:
            self.battery = max(0.0, self.battery - 2.0 * hours)
            self.charging = self.battery <= 5.0
        return ProbeReading(battery=self.battery, charging=self.charging, network=self.network,
                            metered=self.metered, bandwidth_kbps=self.bandwidth,
                            rtt_ms=self.rtt, idle=self.idle)  # fmt: skip

    def _telemetry(self) -> None:
        r = self.reading()
        self.seq += 1
        msg = Telemetry(device_id=self.device_id, ts=time.time(), battery=r.battery,
                        charging=r.charging, network=r.network, metered=r.metered,
                        bandwidth_kbps=r.bandwidth_kbps, rtt_ms=r.rtt_ms, idle=r.idle,
                        agent_version=LEAN_AGENT_VERSION, seq=self.seq)  # fmt: skip
        self.publish(b"telemetry", encode(msg))
        self.host.counters.telemetry_sent += 1

    def _on_task(self, payload: bytes) -> None:
        st = self.host.counters
        st.tasks_received += 1
        try:
            task = decode(payload, Task)
        except SchemaError as exc:
            st.tasks_invalid += 1
            st.count_error(f"task_{exc.reason}")
            return
        if task.device_id != self.device_id:
            st.tasks_invalid += 1
            st.count_error("task_device_id")
            return
        if task.task_id == self.last_task:  # a redelivery: answered already
            st.tasks_duplicate += 1
            return
        self.last_task = task.task_id
        now = time.time()
        reply = TaskResponse(task_id=task.task_id, device_id=self.device_id, status="declined",
                             reason=decline_reason(task, self.reading(), now), ts=now)  # fmt: skip
        st.tasks_declined += 1
        self.publish(b"task_status", encode(reply), 1)

    def _on_pace(self, payload: bytes) -> None:
        try:
            pace = decode(payload, Pace)
        except SchemaError as exc:
            self.host.counters.count_error(f"pace_{exc.reason}")
            return
        if pace.device_id != self.device_id:
            self.host.counters.count_error("pace_device_id")
            return
        self.host.counters.paced += 1
        self.pace_until = self.host.loop.time() + min(pace.retry_after_s, MAX_PACE_S)

    def farewell(self, message: tuple[str, bytes, int, bool] | None) -> None:
        """A clean stop: the farewell status (no will on a clean disconnect), DISCONNECT."""
        self.state = STOPPED
        if self.transport is None:
            return
        if message is not None:
            topic, payload, qos, retain = message
            self._write(mq.publish(topic.encode(), payload, qos, packet_id=self._next_pid(),
                                   retain=retain))  # fmt: skip
        self._write(mq.DISCONNECT_PACKET)
        self.transport.close()
