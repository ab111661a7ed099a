"""Device state: the ``DeviceProbe`` protocol, a Linux probe and a simulated probe.

``SimulatedProbe`` drives the fleet simulator's heterogeneity: battery drain (faster while
training) and charge while plugged, plug/unplug and connectivity changes as Poisson events,
a compute-speed factor and a time-compression factor ``time_scale`` (simulated seconds per
real second).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from schemas.messages import Network


@dataclass(frozen=True, slots=True)
class ProbeReading:
    """One snapshot of the device's resources (the fields of ``Telemetry``)."""

    battery: float = 100.0  # percent
    charging: bool = True
    network: Network = "wifi"
    metered: bool = False
    bandwidth_kbps: float = 0.0
    rtt_ms: float = 0.0
    idle: bool = True


@runtime_checkable
class DeviceProbe(Protocol):
    """What the agent asks the device about."""

    @property
    def compute_speed(self) -> float:
        """Relative compute speed (1.0 = reference device; 0.25 = four times slower)."""
        ...

    def read(self) -> ProbeReading:
        """Current resources."""
        ...

    def set_training(self, training: bool) -> None:
        """Told when local training starts/stops (affects simulated drain)."""
        ...

    def compute_delay(self, samples: int) -> float:
        """Extra real seconds a device of this speed needs for ``samples`` sample-steps."""
        ...


# --------------------------------------------------------------------------- Linux


class LinuxProbe:
    """Reads ``/sys/class/power_supply``, the default route's interface type and idleness.

    ``metered`` cannot be discovered reliably on Linux and comes from configuration.
    Missing files (desktops, containers) read as "mains powered, 100 %".

    ``idle`` is True when the 1-minute load average (``/proc/loadavg``) per usable CPU is at
    most ``idle_max_load`` and, if ``idle_input_s > 0``, no user typed on a terminal for
    ``idle_input_s`` seconds: the newest access time of ``/dev/tty[0-9]*`` and
    ``/dev/pts/[0-9]*``, which the kernel bumps on terminal input (what ``w`` reports as
    IDLE). A signal that cannot be read (no ``/proc/loadavg``, no terminal devices) does not
    make the device busy.
    """

    def __init__(
        self,
        *,
        metered: bool = False,
        sysfs: Path = Path("/sys"),
        proc: Path = Path("/proc"),
        dev: Path = Path("/dev"),
        speed: float = 1.0,
        idle_max_load: float = 0.5,
        idle_input_s: float = 300.0,
        cpus: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metered = metered
        self._ps = sysfs / "class" / "power_supply"
        self._net = sysfs / "class" / "net"
        self._proc = proc
        self._dev = dev
        self._speed = speed
        self.idle_max_load = idle_max_load
        self.idle_input_s = idle_input_s
        self._cpus = max(1, cpus or _usable_cpus())
        self._clock = clock

    @property
    def compute_speed(self) -> float:
        return self._speed

    def set_training(self, training: bool) -> None:
        return None

    def compute_delay(self, samples: int) -> float:
        return 0.0

    def read(self) -> ProbeReading:
        battery, charging = self._power()
        return ProbeReading(
            battery=battery,
            charging=charging,
            network=self._network(),
            metered=self._metered,
            idle=self.idle(),
        )

    def idle(self) -> bool:
        """Low load and (when visible) no recent terminal input; see the class docstring."""
        load = self.load_per_cpu()
        if load is not None and load > self.idle_max_load:
            return False
        if self.idle_input_s > 0:
            quiet = self.input_idle_s()
            if quiet is not None and quiet < self.idle_input_s:
                return False
        return True

    def load_per_cpu(self) -> float | None:
        """1-minute load average divided by the usable CPUs; None if unreadable."""
        try:
            return float(self._read(self._proc / "loadavg").split()[0]) / self._cpus
        except (IndexError, ValueError):
            return None

    def input_idle_s(self) -> float | None:
        """Seconds since the last terminal input; None when no terminal device is visible."""
        newest: float | None = None
        for pattern in ("tty[0-9]*", "pts/[0-9]*"):
            try:
                paths = list(self._dev.glob(pattern))
            except OSError:
                continue
            for path in paths:
                try:
                    atime = path.stat().st_atime
                except OSError:
                    continue
                newest = atime if newest is None else max(newest, atime)
        return None if newest is None else max(0.0, self._clock() - newest)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def _power(self) -> tuple[float, bool]:
        batteries: list[tuple[float, str]] = []
        mains_online = False
        try:
            supplies = sorted(self._ps.iterdir())
        except OSError:
            return 100.0, True
        for dev in supplies:
            kind = self._read(dev / "type")
            if kind == "Battery":
                cap = self._read(dev / "capacity")
                status = self._read(dev / "status")
                try:
                    batteries.append((min(100.0, max(0.0, float(cap))), status))
                except ValueError:
                    continue
            elif kind in ("Mains", "USB") and self._read(dev / "online") == "1":
                mains_online = True
        if not batteries:
            return 100.0, True
        level = sum(b for b, _ in batteries) / len(batteries)
        charging = mains_online or any(s in ("Charging", "Full") for _, s in batteries)
        return level, charging

    def _default_iface(self) -> str:
        text = self._read(self._proc / "net" / "route")
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 2 and parts[1] == "00000000":
                return parts[0]
        return ""

    def _network(self) -> Network:
        iface = self._default_iface()
        if not iface:
            return "none"
        base = self._net / iface
        if (base / "wireless").exists() or (base / "phy80211").exists():
            return "wifi"
        if iface.startswith(("wwan", "rmnet", "ppp", "usb")):
            return "cellular"
        return "ethernet"


def _usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return len(affinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- simulated


class SimulatedProbe:
    """Seeded device model for simulations and tests.

    Rates are per *simulated* hour; ``time_scale`` simulated seconds pass per real second
    (read from ``clock``, ``time.monotonic`` by default). Events (plug/unplug, network
    change) are Poisson with the given hourly rates. ``set(...)`` overrides the state
    (tests: "unplug now").
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        battery: float | None = None,
        charging: bool | None = None,
        network: Network | None = None,
        metered: bool | None = None,
        compute_speed: float | None = None,
        time_scale: float = 1.0,
        drain_idle_per_h: float = 2.0,
        drain_train_per_h: float = 25.0,
        charge_per_h: float = 40.0,
        plug_rate_per_h: float = 0.2,
        unplug_rate_per_h: float = 0.3,
        network_change_per_h: float = 0.5,
        dropout_share: float = 0.02,  # share of network changes that go to "none"
        base_samples_per_s: float = 2000.0,  # sample-steps/s of a compute_speed=1 device
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rng = random.Random(seed)
        r = self._rng
        nets: list[Network] = ["wifi", "cellular"]
        net: Network = network or r.choices(nets, weights=[0.7, 0.3])[0]
        self._state = ProbeReading(
            battery=float(battery if battery is not None else r.uniform(15.0, 100.0)),
            charging=bool(charging if charging is not None else r.random() < 0.35),
            network=net,
            metered=bool(metered if metered is not None else net == "cellular"),
            bandwidth_kbps=self._bandwidth(net),
            rtt_ms=self._rtt(net),
            idle=True,
        )
        self._speed = float(
            compute_speed if compute_speed is not None else math.exp(r.gauss(0.0, 0.6))
        )
        if self._speed <= 0:
            raise ValueError("compute_speed must be > 0")
        self.time_scale = float(time_scale)
        self.drain_idle_per_h = drain_idle_per_h
        self.drain_train_per_h = drain_train_per_h
        self.charge_per_h = charge_per_h
        self.plug_rate_per_h = plug_rate_per_h
        self.unplug_rate_per_h = unplug_rate_per_h
        self.network_change_per_h = network_change_per_h
        self.dropout_share = dropout_share
        self.base_samples_per_s = base_samples_per_s
        self._clock = clock
        self._last = clock()
        self._training = False

    @property
    def compute_speed(self) -> float:
        return self._speed

    def set_training(self, training: bool) -> None:
        self._advance()
        self._training = training
        self._state = replace(self._state, idle=not training)

    def compute_delay(self, samples: int) -> float:
        sim_s = samples / (self.base_samples_per_s * self._speed)
        return sim_s / self.time_scale if self.time_scale > 0 else 0.0

    def set(self, **changes: object) -> None:
        """Override fields of the current reading (e.g. ``set(charging=False)``)."""
        self._advance()
        self._state = replace(self._state, **changes)  # type: ignore[arg-type]

    def read(self) -> ProbeReading:
        self._advance()
        return self._state

    # ----------------------------------------------------------------- dynamics

    def _bandwidth(self, net: Network) -> float:
        mean = {"wifi": 20000.0, "ethernet": 100000.0, "cellular": 5000.0, "none": 0.0}[net]
        return round(mean * self._rng.uniform(0.3, 1.5), 1)

    def _rtt(self, net: Network) -> float:
        mean = {"wifi": 30.0, "ethernet": 5.0, "cellular": 80.0, "none": 0.0}[net]
        return round(mean * self._rng.uniform(0.5, 2.0), 1)

    def _event(self, rate_per_h: float, dt_h: float) -> bool:
        return rate_per_h > 0 and self._rng.random() < 1.0 - math.exp(-rate_per_h * dt_h)

    def before_advance(self) -> None:
        """Hook for subclasses, called before each state advance (e.g. to vary the rates
        with the simulated time of day); does nothing here."""

    def now(self) -> float:
        """The probe's clock (real seconds; ``time_scale`` applies on top)."""
        return self._clock()

    def _advance(self) -> None:
        self.before_advance()
        now = self._clock()
        dt_h = max(0.0, now - self._last) * self.time_scale / 3600.0
        self._last = now
        if dt_h == 0.0:
            return
        s = self._state
        battery, charging, net, metered = s.battery, s.charging, s.network, s.metered
        if charging:
            battery += self.charge_per_h * dt_h
            if self._event(self.unplug_rate_per_h, dt_h):
                charging = False
        else:
            battery -= (self.drain_train_per_h if self._training else self.drain_idle_per_h) * dt_h
            if self._event(self.plug_rate_per_h, dt_h) or battery <= 5.0:
                charging = True  # people plug in near empty
        battery = min(100.0, max(0.0, battery))
        bw, rtt = s.bandwidth_kbps, s.rtt_ms
        if self._event(self.network_change_per_h, dt_h):
            if self._rng.random() < self.dropout_share:
                net = "none"
            else:
                net = "wifi" if net != "wifi" else "cellular"
            metered = net == "cellular"
            bw, rtt = self._bandwidth(net), self._rtt(net)
        self._state = replace(
            s,
            battery=round(battery, 3),
            charging=charging,
            network=net,
            metered=metered,
            bandwidth_kbps=bw,
            rtt_ms=rtt,
        )
