"""A three-master Redis Cluster on 127.0.0.1: redis-server (Debian package, Redis 7).

Each master is one ``redis-server --cluster-enabled yes`` in ``workdir/node-<i>`` on a
free port, with its cluster bus on a second free port (``cluster-port``: the default
``port + 10000`` may fall into the kernel's ephemeral range), durable as
``stack.redis.RedisServer`` is (append-only file, ``everysec``, no RDB snapshots). The
16384 slots are split into three even ranges (``CLUSTER ADDSLOTS``) and the nodes
``CLUSTER MEET``; ``wait_ready`` returns once every node reports ``cluster_state:ok`` and
knows all masters. No replicas: this is the layout the coordinator's key design is tested
against (``tests/test_redis_cluster.py``), not a highly available deployment.

``url`` is ``redis+cluster://127.0.0.1:<port of node 1>``, the scheme
``coordinator.redis_client`` opens as a ``redis.asyncio.RedisCluster``. Stopping and
starting the same ``RedisCluster`` reuses its ports and directories: each node's
``nodes.conf`` keeps its slots, so the cluster comes back with its data.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from stack.errors import StackError
from stack.procs import ManagedProcess, free_port
from stack.redis import redis_binary

SLOTS = 16384
CLUSTER_SCHEME = "redis+cluster"


def slot_ranges(n: int) -> list[tuple[int, int]]:
    """``n`` contiguous, inclusive slot ranges covering 0..16383 (pure)."""
    bounds = [SLOTS * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


class _Node:
    """One cluster master: its ports, directory and process."""

    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.bus_port = free_port()
        self.proc: ManagedProcess | None = None

    def start(self, detach: bool) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port), "--cluster-node-timeout", "5000",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", str(self.workdir), "--maxclients", "20000",
                "--daemonize", "no"]  # fmt: skip
        self.proc = ManagedProcess(f"redis-cluster-{self.port}", argv,
                                   log_path=self.workdir / "redis.log", detach=detach)  # fmt: skip
        self.proc.start()


class RedisCluster:
    """Three Redis Cluster masters; ``start()``/``stop()`` idempotent (the Server protocol
    of ``stack.launcher``)."""

    impl = "redis-cluster"
    detach = False
    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        binary = redis_binary()
        if binary is None:
            raise StackError("Redis Cluster: redis-server not installed "
                             "(apt-get install -y redis-server)")  # fmt: skip
        self.workdir = workdir
        self.nodes = [_Node(workdir / f"node-{i + 1}", binary) for i in range(masters)]
        self.port = self.nodes[0].port

    @property
    def url(self) -> str:
        return f"{CLUSTER_SCHEME}://{self.host}:{self.port}"

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, n.port) for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            if node.proc is None or not node.proc.alive():
                node.start(self.detach)

    def wait_ready(self, timeout: float = 30.0) -> None:
        asyncio.run(self._form(time.monotonic() + timeout))

    async def _form(self, deadline: float) -> None:
        import redis.asyncio as aioredis

        clients: list[Any] = [aioredis.Redis(host=self.host, port=n.port, socket_timeout=3.0,
                                  socket_connect_timeout=3.0, decode_responses=True)
                   for n in self.nodes]  # fmt: skip
        try:
            await self._until(deadline, "answering", lambda: _all(c.ping() for c in clients))
            infos = [await c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(_field(i, "cluster_slots_assigned") == "0" for i in infos):
                for c, (lo, hi) in zip(clients, slot_ranges(len(clients)), strict=True):
                    await c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
                for n in self.nodes[1:]:
                    await clients[0].execute_command("CLUSTER", "MEET", self.host, n.port,
                                                     n.bus_port)  # fmt: skip
            want = str(len(self.nodes))

            async def formed() -> bool:
                for c in clients:
                    info = await c.execute_command("CLUSTER", "INFO")
                    if _field(info, "cluster_state") != "ok" or \
                            _field(info, "cluster_known_nodes") != want:  # fmt: skip
                        return False
                return True

            await self._until(deadline, "cluster_state:ok", formed)
        finally:
            for c in clients:
                await c.aclose()

    async def _until(self, deadline: float, what: str, check: Any) -> None:
        last = ""
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.proc is None or not n.proc.alive():
                    tail = n.proc.log_tail() if n.proc else ""
                    raise StackError(f"Redis Cluster: node on port {n.port} exited: {tail}")
            try:
                if await check():
                    return
            except Exception as exc:
                last = f" ({type(exc).__name__}: {exc})"
            await asyncio.sleep(0.1)
        raise StackError(f"Redis Cluster: not {what} on ports "
                         f"{[n.port for n in self.nodes]}{last}")  # fmt: skip

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                n.proc.stop()

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.proc.pid]


async def _all(aws: Any) -> bool:
    for aw in aws:
        await aw
    return True


def _field(info: Any, name: str) -> str:
    """One field of ``CLUSTER INFO`` (a text blob, or a dict when the client parsed it)."""
    if isinstance(info, dict):
        return str(info.get(name, ""))
    for line in str(info).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""
