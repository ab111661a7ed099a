"""MQTT broker: Mosquitto (Debian package) with a generated config, or amqtt as fallback."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

from stack.errors import StackError
from stack.procs import ManagedProcess, ProcessServer


def mosquitto_binary() -> str | None:
    for cand in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        found = shutil.which(cand)
        if found:
            return found
    return None


async def mqtt_ping(host: str, port: int, *, timeout: float = 3.0) -> None:
    """Connect and disconnect a client (raises when the broker does not answer)."""
    import aiomqtt

    async with aiomqtt.Client(host, port, identifier="", timeout=timeout):
        pass


def _wait(name: str, proc: ManagedProcess, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"MQTT ({name}) exited during start: {proc.log_tail()}")
        try:
            asyncio.run(mqtt_ping(host, port))
            return
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise StackError(f"MQTT ({name}): not ready on {host}:{port} after {timeout:.0f}s ({last})")


class _Broker(ProcessServer):
    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        _wait(self.impl, self.proc, self.host, self.port, timeout)


class Mosquitto(_Broker):
    impl = "mosquitto"

    def __init__(self, workdir: Path, *, max_connections: int = -1) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise StackError("MQTT: mosquitto not installed (apt-get install -y mosquitto)")
        super().__init__(workdir)
        self.binary = binary
        self.max_connections = max_connections

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence false",
                    f"max_connections {self.max_connections}",
                    "max_queued_messages 100000",
                    "max_inflight_messages 200",
                    "set_tcp_nodelay true",
                    "log_dest stdout",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "connection_messages false",
                    # Stay root when started as root: dropping privileges would clear
                    # PR_SET_PDEATHSIG and let the broker outlive a killed parent.
                    *(["user root"] if os.geteuid() == 0 else []),
                    "",
                ]
            )
        )
        self._launch([self.binary, "-c", str(conf)], "mosquitto.log")


class Amqtt(_Broker):
    """amqtt's broker in a child Python process: the pip-only fallback."""

    impl = "amqtt"

    def __init__(self, workdir: Path) -> None:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise StackError(
                "MQTT: neither mosquitto nor amqtt is installed "
                "(apt-get install -y mosquitto, or pip install 'fedfleet[fallback]')"
            ) from exc
        super().__init__(workdir)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        argv = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
        self._launch(argv, "amqtt.log")
