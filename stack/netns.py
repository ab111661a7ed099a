"""Hosts on one machine: Linux network namespaces on a bridge, each with its own address.

``Network`` makes a bridge in the root namespace (``<prefix>br``, address ``10.A.B.1/24``)
and, per host, a namespace ``<prefix>-<name>`` joined to it by a veth pair (the host's
``eth0``, address ``10.A.B.n``). Every host reaches every other one and the root namespace
(the driver, the simulated fleet) reaches them all, over the bridge; nothing is routed
off the machine. Faults act on a host's link:

* ``partition(name)`` / ``heal(name)``: the host's veth down / up (packets are dropped,
  no RST: connections hang until TCP's own timeouts, as across a real partition);
* ``shape(name, rate_kbit=...)`` / ``unshape(name)``: a ``tbf`` bandwidth cap with a short
  queue on both ends of the link (a full queue drops packets). ``netem`` (delay, random
  loss) needs the ``sch_netem`` kernel module, which machines without it refuse
  ("Specified qdisc kind is unknown"); a delaying TCP proxy (``stack.proxy``) adds latency
  instead where it is needed.

Names carry a random prefix (``ff`` + 5 hex digits), so parallel runs never clash. ``stop()``
removes everything (idempotent; ``with``/``async with`` call it even on failure), and
``start()`` first removes what a run killed before its teardown left behind (recorded in
``/run/fedfleet-netns/<prefix>.json`` with the owner's pid). Needs root and iproute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stack.errors import StackError
from stack.procs import pid_alive

STATE_DIR = Path(os.environ.get("FEDFLEET_NETNS_STATE", "/run/fedfleet-netns"))


@dataclass(frozen=True)
class Host:
    """One namespace: ``name`` (short, e.g. ``kafka-1``), ``ns``, ``ip``, root-side ``veth``."""

    name: str
    ns: str
    ip: str
    veth: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (inside ``ns`` when given); a ``StackError`` with its stderr."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise StackError(f"netns: {' '.join(argv)} failed: {res.stderr.strip()}")
    return res.stdout


def _tc(*args: str, ns: str | None = None, check: bool = True) -> None:
    argv = [*(["ip", "netns", "exec", ns] if ns else []), "tc", *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise StackError(f"netns: {' '.join(argv)} failed: {res.stderr.strip()}")


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can): not root, no iproute2, no netns."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install -y iproute2)"
    probe = f"ffprobe{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _used_subnets() -> list[ipaddress.IPv4Network]:
    out = []
    for line in ip("-4", "route", "show", "table", "all", check=False).splitlines():
        with contextlib.suppress(ValueError):
            out.append(ipaddress.IPv4Network(line.split()[0], strict=False))
    for line in ip("-4", "-o", "addr", check=False).splitlines():
        parts = line.split()
        if "inet" in parts:
            with contextlib.suppress(ValueError, IndexError):
                out.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return out


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_subnets()
    rng = random.SystemRandom()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise StackError("netns: no free 10.x.y.0/24 subnet")


def reap_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Remove the namespaces and links of runs whose owner died before its teardown."""
    done: list[str] = []
    if not state_dir.is_dir():
        return done
    for f in state_dir.glob("ff*.json"):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(st.get("pid", 0))):
            continue
        _remove(st.get("namespaces", []), st.get("links", []))
        f.unlink(missing_ok=True)
        done.append(f.stem)
    return done


def _remove(namespaces: Sequence[str], links: Sequence[str]) -> None:
    for ns in namespaces:
        ip("netns", "del", ns, check=False)
    for link in links:
        ip("link", "del", link, check=False)


class Network:
    """A bridge and hosts (namespaces) on it; ``start()``/``stop()`` idempotent."""

    def __init__(self, names: Sequence[str] = (), *, prefix: str | None = None,
                 state_dir: Path = STATE_DIR) -> None:  # fmt: skip
        self.prefix = prefix or f"ff{secrets.token_hex(3)[:5]}"
        if len(self.prefix) > 9:
            raise StackError("netns: prefix too long (interface names are 15 characters)")
        self.bridge = f"{self.prefix}br"
        self.state_file = state_dir / f"{self.prefix}.json"
        self.names = list(names)
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self._started = False

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _record(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        links = [self.bridge, *(h.veth for h in self.hosts.values())]
        self.state_file.write_text(json.dumps({
            "pid": os.getpid(), "links": links,
            "namespaces": [h.ns for h in self.hosts.values()],
        }))  # fmt: skip

    def start(self) -> Network:
        if self._started:
            return self
        reason = unavailable()
        if reason:
            raise StackError(f"netns: {reason}")
        reap_stale(self.state_file.parent)
        self._started = True
        try:
            self.subnet = _free_subnet()
            self._record()
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for name in self.names:
                self._add(name)
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, name: str) -> Host:
        """A new host (``start()`` makes those named at construction)."""
        if not self._started:
            raise StackError("netns: start() the network first")
        return self._add(name)

    def _add(self, name: str) -> Host:
        assert self.subnet is not None
        n = len(self.hosts)
        if n + 2 >= self.subnet.num_addresses - 1:
            raise StackError("netns: subnet full")
        host = Host(name, f"{self.prefix}-{name}", str(self.subnet.network_address + n + 2),
                    f"{self.prefix}v{n}")  # fmt: skip
        self.hosts[name] = host
        self._record()
        peer = f"{self.prefix}p{n}"
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", host.ns)
        ip("link", "set", peer, "name", "eth0", ns=host.ns)
        ip("addr", "add", f"{host.ip}/24", "dev", "eth0", ns=host.ns)
        ip("link", "set", "eth0", "up", ns=host.ns)
        ip("link", "set", "lo", "up", ns=host.ns)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        return host

    def stop(self) -> None:
        """Delete every namespace, veth and the bridge (processes in a host must be gone
        first: a namespace lives as long as a process in it)."""
        if not self._started:
            return
        self._started = False
        _remove([h.ns for h in self.hosts.values()],
                [*(h.veth for h in self.hosts.values()), self.bridge])  # fmt: skip
        self.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ faults
    def partition(self, name: str) -> None:
        """Cut host ``name`` off the network (its link down)."""
        ip("link", "set", self.hosts[name].veth, "down")

    def heal(self, name: str) -> None:
        ip("link", "set", self.hosts[name].veth, "up")

    def shape(self, name: str, *, rate_kbit: int, burst_bytes: int = 4096,
              latency_ms: int = 50) -> None:  # fmt: skip
        """Cap host ``name``'s link at ``rate_kbit`` in both directions (``tbf``; a packet
        that would wait more than ``latency_ms`` in the queue is dropped)."""
        h = self.hosts[name]
        spec = ["root", "tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst_bytes),
                "latency", f"{latency_ms}ms"]  # fmt: skip
        _tc("qdisc", "replace", "dev", h.veth, *spec)
        _tc("qdisc", "replace", "dev", "eth0", *spec, ns=h.ns)

    def unshape(self, name: str) -> None:
        h = self.hosts[name]
        _tc("qdisc", "del", "dev", h.veth, "root", check=False)
        _tc("qdisc", "del", "dev", "eth0", "root", check=False, ns=h.ns)

    @contextlib.asynccontextmanager
    async def partitioned(self, name: str) -> AsyncIterator[Host]:
        """Host ``name`` partitioned for the body of the ``async with``."""
        await asyncio.to_thread(self.partition, name)
        try:
            yield self.hosts[name]
        finally:
            await asyncio.to_thread(self.heal, name)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Network:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
