"""One fleet process: ``python -m sim.worker`` runs a slice of the simulated fleet.

Protocol (JSON lines): the first stdin line is the config ``{"spec": {FleetSpec fields},
"mqtt_host", "mqtt_port", "api_url", "public_key_hex", "report_s", "device_mode",
"brokers"}`` (``brokers``: ``[[host, port], ...]``, every broker of a lean fleet)
(``device_mode``: ``agent``, the default, runs real ``EdgeAgent``s (``sim.fleet``);
``lean`` runs wire-level devices that never train (``sim.lean_fleet``)); later stdin lines
are commands ``{"cmd": "abort_network", "share": 1.0}``, ``{"cmd": "churn", "share",
"window_s", "offline_s"}``, ``{"cmd": "stop"}``. Every ``report_s`` the worker prints one
report line ``{"t", "connected", "busy", "rss_mb", "stats": {...}}`` (lean: and
``per_broker``, the sessions up on each broker) to stdout; the last
line before exit has ``"final": true`` and the acked update ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent import mqtt_patch
from edge_agent.credentials import DeviceCredential
from sim.fleet import FleetSpec, SimulatedFleet
from sim.lean_fleet import LeanFleet
from sim.tasks import task_data

Fleet = SimulatedFleet | LeanFleet


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class LoopLag:
    """Event-loop lag of this process (how late a 0.1 s sleep wakes up): when it grows,
    the simulator, not the servers, is the bottleneck."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            self.samples.append(loop.time() - t - 0.1)
            if len(self.samples) > 600:
                del self.samples[:300]

    def p99(self) -> float:
        xs = sorted(self.samples[-100:])
        return round(xs[int(0.99 * (len(xs) - 1))], 4) if xs else 0.0


LAG = LoopLag()
_BG: set[asyncio.Task[None]] = set()


def _report(fleet: Fleet, final: bool = False) -> None:
    out: dict[str, Any] = {"loop_lag_p99_s": LAG.p99(),
        "t": time.time(), "connected": fleet.connected(), "busy": fleet.busy(),
        "rss_mb": round(rss_mb(), 1), "stats": fleet.stats(),
        "affected": len(fleet.affected), "churn": fleet.churn_events,
    }  # fmt: skip
    if isinstance(fleet, LeanFleet):
        out["per_broker"] = list(fleet.per_broker)
    if final:
        out["final"] = True
        out["acked_ids"] = sorted(fleet.acked)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


async def _commands(fleet: Fleet, done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not done.is_set():
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            done.set()
            return
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "stop":
            done.set()
        elif name == "abort_network":
            fleet.abort_network(float(cmd.get("share", 1.0)))
        elif name == "churn" and isinstance(fleet, SimulatedFleet):
            _BG.add(
                asyncio.create_task(
                    fleet.churn(
                        float(cmd["share"]), float(cmd["window_s"]), float(cmd["offline_s"])
                    )
                )
            )
        elif name == "churn":
            print("sim.worker: churn needs real agents (device_mode agent)", file=sys.stderr)


async def amain() -> None:
    cfg = json.loads(sys.stdin.readline())
    spec = FleetSpec(**cfg["spec"])
    creds = None
    if cfg.get("credentials") is not None:
        creds = {d: DeviceCredential(**c) for d, c in cfg["credentials"].items()}
    ca_file = Path(cfg["ca_file"]) if cfg.get("ca_file") else None
    fleet: Fleet
    if cfg.get("device_mode", "agent") == "lean":
        brokers = [(str(h), int(p)) for h, p in cfg.get("brokers") or ()]
        fleet = LeanFleet(spec, mqtt_host=cfg["mqtt_host"], mqtt_port=int(cfg["mqtt_port"]),
                          credentials=creds, ca_file=ca_file, brokers=brokers)  # fmt: skip
    else:
        train, _ = task_data(spec.task, spec.seed)
        fleet = SimulatedFleet(
            spec, train, mqtt_host=cfg["mqtt_host"], mqtt_port=int(cfg["mqtt_port"]),
            api_url=cfg["api_url"], public_key_hex=cfg.get("public_key_hex", ""),
            credentials=creds, ca_file=ca_file,
        )  # fmt: skip
    report_s = float(cfg.get("report_s", 1.0))
    done = asyncio.Event()
    cmd_task = asyncio.create_task(_commands(fleet, done))
    lag_task = asyncio.create_task(LAG.run())
    async with fleet:
        while not done.is_set():
            _report(fleet)
            try:
                await asyncio.wait_for(done.wait(), report_s)
            except TimeoutError:
                pass
    _report(fleet, final=True)
    cmd_task.cancel()
    lag_task.cancel()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _die_with_parent()
    mqtt_patch.apply()
    _raise_nofile()
    try:
        import uvloop

        uvloop.run(amain())
    except ImportError:  # pragma: no cover
        asyncio.run(amain())


if __name__ == "__main__":
    main()
