"""CPU per device-second: lean wire-level devices (``sim.lean``) against real agents.

One run, one stack: the stack ``fedfleet loadtest`` starts (secure by default: TLS broker,
per-device credentials from enrolment, HTTPS, Redis password; ``--insecure``: anonymous),
with its coordinator. Two fleets connect side by side, each in a worker process of its
own (``sim.pool.FleetPool``, as ``loadtest scale`` runs them): ``--lean`` lean devices and
``--agents`` real ``EdgeAgent``s, every device publishing telemetry every ``--interval``
seconds. After both are connected and one interval has passed (handshakes done), the
worker processes' CPU time (user + system, ``/proc``) is read over ``--window`` seconds:

    µs per device-second = CPU seconds / (devices × window seconds) × 1e6

Each worker's own overheads (its report line every 5 s, the event-loop lag probe) are
included: they are part of what a fleet process costs.

    .venv/bin/python bench/lean_device.py [--lean 5000] [--agents 1000] [--interval 20]
        [--window 60] [--insecure] [--kafka HOST:PORT] [--json]

Numbers are written down in BENCHMARKS.md ("Lean devices"), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.runner import Env, cpu_seconds, environment
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.pool import FleetPool
from sim.worker import rss_mb
from stack import StackSettings


def spec(devices: int, prefix: str, interval: float) -> FleetSpec:
    """The devices ``loadtest scale`` runs (no data partition, no transfer time)."""
    return FleetSpec(devices=devices, telemetry_interval_s=interval, partition=False,
                     transfer=False, connect_per_s=500.0, id_prefix=prefix, keepalive_s=120,
                     reconnect_max_s=20.0, time_scale=1.0)  # fmt: skip


async def wait_connected(pools: dict[str, FleetPool], timeout: float) -> dict[str, float]:
    t0 = time.monotonic()
    took: dict[str, float] = {}
    while len(took) < len(pools) and time.monotonic() - t0 < timeout:
        for name, pool in pools.items():
            if name not in took and pool.snapshot()["connected"] >= pool.spec.devices:
                took[name] = round(time.monotonic() - t0, 1)
        if not all(p.alive() for p in pools.values()):
            raise RuntimeError("a fleet process died (see its log)")
        await asyncio.sleep(0.5)
    missing = [n for n in pools if n not in took]
    if missing:
        raise RuntimeError(f"not all connected after {timeout:.0f} s: {missing}")
    return took


async def measure(env: Env, a: argparse.Namespace) -> dict[str, Any]:
    fleets = {"lean": spec(a.lean, f"bl{env.run_id}", a.interval),
              "agent": spec(a.agents, f"ba{env.run_id}", a.interval)}  # fmt: skip
    ids = [d for s in fleets.values() for d in s.device_ids()]
    enrolled = await enrol_if_secure(env.http, env.services, ids)
    pools = {
        mode: FleetPool(s, processes=1, mqtt_host=env.info.mqtt_host,
                        mqtt_port=env.info.mqtt_port, api_url=env.services.rest_url,
                        log_dir=env.workdir / mode, report_s=5.0,
                        credentials=enrolled.credentials, ca_file=enrolled.ca_file,
                        device_mode=mode)
        for mode, s in fleets.items()
    }  # fmt: skip
    out: dict[str, Any] = {"secure": env.info.mqtt_tls, "enrol_s": round(enrolled.seconds, 1),
                           "interval_s": a.interval, "window_s": a.window}  # fmt: skip
    try:
        for p in pools.values():
            await p.start()
        out["connected_after_s"] = await wait_connected(pools, a.connect_timeout)
        await asyncio.sleep(a.interval)  # every device has reported at least once more
        pids = {m: p.pids()[0] for m, p in pools.items()}
        cpu0 = {m: cpu_seconds(pid) for m, pid in pids.items()}
        sent0 = {m: p.snapshot()["stats"].get("telemetry_sent", 0) for m, p in pools.items()}
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        await asyncio.sleep(a.window)
        dt = time.monotonic() - t0
        rows = {}
        for m, p in pools.items():
            cpu = cpu_seconds(pids[m]) - cpu0[m]
            snap = p.snapshot()
            n = p.spec.devices
            rows[m] = {
                "devices": n, "connected": snap["connected"], "cpu_s": round(cpu, 2),
                "us_per_device_s": round(cpu / (n * dt) * 1e6, 2),
                "msgs_per_s": round((snap["stats"].get("telemetry_sent", 0) - sent0[m]) / dt, 1),
                "rss_mb": round(rss_mb(pids[m]), 1), "loop_lag_p99_s": snap["loop_lag_p99_s"],
            }  # fmt: skip
        out["fleets"] = rows
        out["ratio_agent_over_lean"] = round(
            rows["agent"]["us_per_device_s"] / max(rows["lean"]["us_per_device_s"], 1e-9), 1)
        out["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    finally:
        for p in pools.values():
            await p.stop()
    return out


def table(r: dict[str, Any]) -> str:
    lines = ["| devices | count | connected after | telemetry msgs/s | CPU s in window | "
             "**µs CPU per device-second** | RSS MB | loop lag p99 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m, row in r["fleets"].items():
        lines.append(f"| {m} | {row['devices']:,} | {r['connected_after_s'][m]} s | "
                     f"{row['msgs_per_s']} | {row['cpu_s']} | **{row['us_per_device_s']}** | "
                     f"{row['rss_mb']} | {row['loop_lag_p99_s']} s |")  # fmt: skip
    lines.append(f"\nagent / lean: {r['ratio_agent_over_lean']}x "
                 f"({'secure' if r['secure'] else 'insecure'}, one message per "
                 f"{r['interval_s']:g} s per device, {r['window_s']:g} s window)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lean", type=int, default=5000)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--interval", type=float, default=20.0)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--connect-timeout", type=float, default=300.0)
    p.add_argument("--insecure", action="store_true", help="anonymous broker, plain HTTP")
    p.add_argument("--kafka", metavar="HOST:PORT", help="use this Kafka instead of starting one")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    settings = StackSettings.from_env(kafka_url=a.kafka, secure=not a.insecure)
    log = lambda m: print(f"[stack] {m}", file=sys.stderr)  # noqa: E731

    async def run() -> dict[str, Any]:
        async with environment(settings, aggregators=0, log=log) as env:
            return await measure(env, a)

    try:
        import uvloop

        res = uvloop.run(run())
    except ImportError:  # pragma: no cover
        res = asyncio.run(run())
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(table(res))
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
