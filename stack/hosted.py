"""Servers run inside a host of ``stack.netns``, bound to the host's address, that a fault
test can ``kill -9`` and start again.

``HostedProcess`` is one process in a host (``ip netns exec``: the pid is the server's own,
so ``kill9()`` hits the server); ``HostedRedis`` and ``HostedMosquitto`` are redis-server
(append-only file, ``appendfsync everysec``, its directory kept across restarts) and an
anonymous Mosquitto, each on its host's address. These are the plain servers: the fault
suite runs the stack insecure (see ``loadtest/faults.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from stack.errors import StackError
from stack.mqtt import mosquitto_binary, mqtt_ping
from stack.netns import Host
from stack.procs import ManagedProcess
from stack.redis import redis_binary, redis_ping


class HostedProcess:
    """``argv`` in ``host``; ``start()``/``stop()`` idempotent, ``kill9()`` then ``start()``
    again is a crash and a restart (same argv, same log file, appended)."""

    def __init__(self, host: Host, name: str, argv: Sequence[str], *, log_path: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.host = host
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: ManagedProcess | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self) -> None:
        if self.alive():
            return
        if self.proc is not None:
            self.restarts += 1
        self.proc = ManagedProcess(self.name, self.host.argv(self.argv), log_path=self.log_path,
                                   env=self.env)  # fmt: skip
        self.proc.start()

    def kill9(self) -> None:
        """SIGKILL, and reap it (it is gone when this returns)."""
        if self.proc is None or self.proc.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.proc.wait(timeout=10.0)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=timeout)

    def log_tail(self, lines: int = 15) -> str:
        return self.proc.log_tail(lines) if self.proc else ""


async def wait_until(
    what: str, probe: Callable[[], Awaitable[object]], proc: HostedProcess, timeout: float
) -> None:
    """Await ``probe()`` (a coroutine function) until it returns without raising."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"{what} exited; log {proc.log_path}:\n{proc.log_tail()}")
        try:
            await probe()
            return
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.2)
    raise StackError(f"{what}: not ready after {timeout:.0f}s ({last})")


class HostedRedis(HostedProcess):
    def __init__(self, host: Host, workdir: Path, *, port: int = 6379) -> None:
        binary = redis_binary()
        if binary is None:
            raise StackError("Redis: redis-server not installed (apt-get install -y redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        argv = [binary, "--port", str(port), "--bind", host.ip, "--protected-mode", "no",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", str(workdir), "--maxclients", "10000", "--daemonize", "no"]  # fmt: skip
        super().__init__(host, "redis", argv, log_path=workdir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://{self.host.ip}:{self.port}/0"

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await wait_until("redis", lambda: redis_ping(self.url), self, timeout)


class HostedMosquitto(HostedProcess):
    def __init__(self, host: Host, workdir: Path, *, port: int = 1883) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise StackError("MQTT: mosquitto not installed (apt-get install -y mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        conf = workdir / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {port} {host.ip}", "allow_anonymous true", "persistence false",
            "max_queued_messages 100000", "max_inflight_messages 200",
            "set_tcp_nodelay true", "log_dest stdout", "log_type error", "log_type warning",
            "connection_messages false",
            *(["user root"] if os.geteuid() == 0 else []), "",
        ]))  # fmt: skip
        super().__init__(host, "mosquitto", [binary, "-c", str(conf)],
                         log_path=workdir / "mosquitto.log")  # fmt: skip

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await wait_until("mosquitto", lambda: mqtt_ping(self.host.ip, self.port), self, timeout)
