"""``scale``: N devices connect (connect storm), report telemetry at a set rate (lag),
then all lose their connection at once (reconnect storm).

Brokers: above ``PER_BROKER`` devices the stack starts several Mosquitto processes
(``mqtt_brokers``; one process may open 20,000 files) and every device dials its own
(``schemas.brokers``); the report has one row per broker (sessions, CPU, RSS).

Telemetry lag, end to end, for every device and every message the coordinator stored:
``last_seen - ts`` where ``ts`` is the agent's publish timestamp inside the message and
``last_seen`` the coordinator's wall clock when it wrote that message to Redis (the moment
it becomes visible to REST and selection). The reader polls every device's Redis hash;
a message overwritten before a poll is not sampled (its successor is). A REST check on a
few sampled devices (``GET /v1/devices/{id}``, observed time - ``ts``: an upper bound
including the poll interval) is reported next to it.

Devices: ``device_mode`` ``agent`` runs real ``EdgeAgent``s, ``lean`` the wire-level
devices of ``sim.lean`` (the same MQTT session and messages, no training, ~25x less
CPU per device: BENCHMARKS.md, "Lean devices"),
``auto`` (the default) lean above ``lean_above`` devices. The fleet processes' CPU per
device-second from the connect storm to the end of the steady phase is reported
(``steady.fleet_cpu_us_per_device_s``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from loadtest.runner import Env, ProcWatch, Progress, Timeline
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.pool import FleetPool

log = logging.getLogger(__name__)
BROKER_MAX_CONNECTIONS = 19_990  # one Mosquitto tops out just below 20,000 (BENCHMARKS.md)
PER_BROKER = 15_000  # the automatic broker count keeps each below this many sessions


def brokers_for(devices: int, asked: int = 0) -> int:
    """Brokers for ``devices`` (``asked`` > 0: that many): enough that each holds at most
    ``PER_BROKER`` sessions (one for a fleet that fits), and, once there are several, that
    the others can take a lost broker's devices (N-1 brokers below the file limit)."""
    if asked > 0:
        return asked
    n = max(1, -(-devices // PER_BROKER))
    return n if n == 1 else max(n, -(-devices // BROKER_MAX_CONNECTIONS) + 1)


@dataclass(frozen=True, kw_only=True)
class ScaleSettings:
    devices: int = 1000
    processes: int = 2
    rate: float = 500.0  # telemetry messages/s of the whole fleet
    duration_s: float = 30.0  # steady phase
    connect_per_s: float = 2000.0
    storm_timeout_s: float = 120.0
    rest_samples: int = 10
    lag_sample: int = 2000  # devices whose Redis record is read every second
    seed: int = 0
    device_mode: str = "auto"  # auto | lean | agent
    lean_above: int = 1000  # auto: lean devices above this many
    mqtt_brokers: int = 0  # 0: brokers_for(devices); the stack starts them (schemas.brokers)
    # after the reconnect storm, stop the last broker: its devices fail over to the others
    kill_broker: bool = False

    def __post_init__(self) -> None:
        if self.device_mode not in ("auto", "lean", "agent"):
            raise ValueError(f"device_mode must be auto, lean or agent, not {self.device_mode!r}")

    @property
    def mode(self) -> str:
        """The devices this run uses: ``lean`` or ``agent``."""
        if self.device_mode == "auto":
            return "lean" if self.devices > self.lean_above else "agent"
        return self.device_mode


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


class LagReader:
    """Reads ``ts``/``last_seen`` of every device from the coordinator's Redis."""

    def __init__(self, redis: Redis, prefix: str, ids: list[str]) -> None:
        self.r = redis
        self.keys = [Keys(prefix).device(d) for d in ids]
        self.seen: dict[str, float] = {}
        self.lags: list[float] = []
        self.phase_lags: dict[str, list[float]] = {}

    async def poll(self, phase: str) -> int:
        new = 0
        for i in range(0, len(self.keys), 2000):
            pipe = self.r.pipeline(transaction=False)
            chunk = self.keys[i : i + 2000]
            for k in chunk:
                pipe.hmget(k, "ts", "last_seen")
            for k, (ts, ls) in zip(chunk, await pipe.execute(), strict=True):
                if ts is None or ls is None or self.seen.get(k) == ts:
                    continue
                self.seen[k] = ts
                lag = float(ls) - float(ts)
                self.lags.append(lag)
                self.phase_lags.setdefault(phase, []).append(lag)
                new += 1
        return new

    async def online(self, prefix: str) -> int:
        return int(await self.r.zcard(Keys(prefix).seen))


async def rest_sampler(env: Env, ids: list[str], out: list[float], stop: asyncio.Event) -> None:
    last: dict[str, float] = {}
    while not stop.is_set():
        for d in ids:
            try:
                r = await env.http.get(f"/v1/devices/{d}")
            except Exception:
                continue
            if r.status_code == 200:
                ts = r.json().get("ts")
                if ts is not None and last.get(d) != ts:
                    if d in last:  # the first reading may be arbitrarily old
                        out.append(time.time() - float(ts))
                    last[d] = ts
        await asyncio.sleep(0.25)


def _lag_stats(xs: list[float]) -> dict[str, Any]:
    return {"samples": len(xs), "p50_s": round(pct(xs, 50), 4), "p99_s": round(pct(xs, 99), 4),
            "max_s": round(max(xs), 4) if xs else None}  # fmt: skip


async def run_scale(env: Env, s: ScaleSettings, *, quiet: bool) -> dict[str, Any]:
    interval = max(0.5, s.devices / s.rate)
    spec = FleetSpec(
        devices=s.devices, seed=s.seed, telemetry_interval_s=interval, partition=False,
        transfer=False, connect_per_s=s.connect_per_s, id_prefix=f"sc{env.run_id}",
        keepalive_s=120, reconnect_max_s=20.0, time_scale=1.0,
    )  # fmt: skip
    ids = spec.device_ids()
    brokers = env.info.broker_addresses
    if s.devices > BROKER_MAX_CONNECTIONS * len(brokers):
        log.warning("scale: %d devices on %d Mosquitto(s), each topping out below 20,000 "
                    "connections: the rest will keep retrying", s.devices,
                    len(brokers))  # fmt: skip
    prefix = env.services.redis_prefix
    redis = redis_client(env.info.redis_url)  # a single Redis or a Redis Cluster
    lag_ids = random.Random(s.seed + 1).sample(ids, min(len(ids), s.lag_sample))
    reader = LagReader(redis, prefix, lag_ids)
    timeline = Timeline()
    enrolled = await enrol_if_secure(env.http, env.services, ids)  # a secure stack: first
    pool = FleetPool(
        spec, processes=s.processes, mqtt_host=env.info.mqtt_host, mqtt_port=env.info.mqtt_port,
        api_url=env.services.rest_url, log_dir=env.workdir, report_s=0.5,
        credentials=enrolled.credentials, ca_file=enrolled.ca_file, device_mode=s.mode,
        brokers=brokers,
    )  # fmt: skip
    out: dict[str, Any] = {
        "devices": s.devices, "processes": pool.processes, "device_mode": s.mode,
        "telemetry_interval_s": round(interval, 3), "rate_target": s.rate,
        "secure": env.info.mqtt_tls, "enrol_s": round(enrolled.seconds, 2),
        "mqtt_brokers": len(brokers),
    }  # fmt: skip
    rest_lags: list[float] = []
    stop_rest = asyncio.Event()
    total = s.storm_timeout_s * 2 + s.duration_s
    try:
        with Progress("scale", total, quiet=quiet) as bar:
            t0 = time.monotonic()
            await pool.start()
            pids = {**env.services.pids(), **{f"fleet-{i}": p for i, p in enumerate(pool.pids())}}
            if env.info.mqtt_pids:  # several brokers: kafka, every mosquitto, redis
                pids["kafka"], pids["redis"] = env.info.pids[0], env.info.pids[-1]
                pids |= {f"mosquitto-{i}": p for i, p in enumerate(env.info.mqtt_pids)}
            else:
                for name, pid in zip(("kafka", "mosquitto", "redis"), env.info.pids,
                                     strict=False):  # fmt: skip
                    pids[name] = pid
            watch = ProcWatch(pids)
            watch.start()

            async def sample(phase: str) -> dict[str, Any]:
                snap = pool.snapshot()
                online = await reader.online(prefix)
                await reader.poll(phase)
                watch.sample()
                row = timeline.add(phase=phase, connected=snap["connected"], online=online,
                                   offline=s.devices - online, idle=online, training=0,
                                   telemetry_sent=snap["stats"].get("telemetry_sent", 0),
                                   fleet_rss_mb=snap["rss_mb"],
                                   connects=snap["stats"].get("connects", 0),
                                   loop_lag_s=snap["loop_lag_p99_s"])  # fmt: skip
                return row

            async def until_all(
                phase: str, key: str, timeout: float, base: int = 0
            ) -> float | None:
                start = time.monotonic()
                while time.monotonic() - start < timeout:
                    row = await sample(phase)
                    have = row[key] - base
                    bar.update(time.monotonic() - t0, f"{key}={have}/{s.devices}", phase)
                    if have >= s.devices:
                        return round(time.monotonic() - start, 2)
                    if not pool.alive():
                        break
                    await asyncio.sleep(0.5)
                return None

            out["connect_storm"] = {
                "all_connected_s": await until_all("connect", "connected", s.storm_timeout_s),
                "all_online_at_coordinator_s": await until_all("connect", "online", 30.0),
                "connect_rate_target_per_s": s.connect_per_s,
            }
            out["connect_storm"]["online_total_s"] = round(time.monotonic() - t0, 2)
            samples = random.Random(s.seed).sample(ids, min(s.rest_samples, len(ids)))
            rest = asyncio.create_task(rest_sampler(env, samples, rest_lags, stop_rest))
            reader.phase_lags.pop("steady", None)
            steady_watch = ProcWatch(pids)  # CPU of the steady phase alone
            steady_watch.start()
            sent0 = pool.snapshot()["stats"].get("telemetry_sent", 0)
            ts0 = time.monotonic()
            while time.monotonic() - ts0 < s.duration_s:
                row = await sample("steady")
                lag = reader.phase_lags.get("steady", [])
                bar.update(time.monotonic() - t0, f"steady: online={row['online']} "
                           f"lag p99={pct(lag, 99):.3f}s n={len(lag)}", "steady")  # fmt: skip
                await asyncio.sleep(1.0)
            stop_rest.set()
            await rest
            sent1 = pool.snapshot()["stats"].get("telemetry_sent", 0)
            lags_loop = [r["loop_lag_s"] for r in timeline.rows if r["phase"] == "steady"]
            resources = watch.read()
            fleet_cpu = sum(v["cpu_share"] for k, v in resources.items() if k.startswith("fleet-"))
            out["steady"] = {
                "fleet_loop_lag_p99_s_max": max(lags_loop, default=0.0),
                "duration_s": s.duration_s,
                "telemetry_msgs_per_s": round((sent1 - sent0) / (time.monotonic() - ts0), 1),
                "lag_redis": _lag_stats(reader.phase_lags.get("steady", [])),
                "lag_rest_sampled": _lag_stats(rest_lags),
                "process_resources": resources,
                "process_cpu_steady": {k: v["cpu_share"] for k, v in steady_watch.read().items()},
                "sessions_per_broker": pool.snapshot()["per_broker"],
                # since the connect storm began: its connects and handshakes included
                "fleet_cpu_us_per_device_s": round(fleet_cpu * 1e6 / s.devices, 2),
                "redis": await _redis_info(env.info.redis_admin_url or env.info.redis_url),
            }
            # Reconnect storm: every device loses its connection at the same moment.
            storm_t = time.monotonic()
            connects0 = int(pool.snapshot()["stats"].get("connects", 0))
            await pool.broadcast({"cmd": "abort_network", "share": 1.0})
            reconnected = await until_all("reconnect", "connects", s.storm_timeout_s, connects0)
            online_back = await until_all("reconnect", "online", 30.0)
            out["reconnect_storm"] = {
                "all_reconnected_s": reconnected,
                "all_online_at_coordinator_s": online_back,
                "total_s": round(time.monotonic() - storm_t, 2),
                "lag_redis": _lag_stats(reader.phase_lags.get("reconnect", [])),
                "disconnects_counted": pool.snapshot()["stats"].get("disconnects", 0),
            }
            out["process_resources"] = watch.read()
            out["brokers"] = _per_broker(brokers, out["steady"], out["process_resources"])
            if s.kill_broker and len(brokers) > 1:
                out["broker_kill"] = await _kill_broker(env, pool, s, brokers[-1], sample,
                                                        reader.phase_lags)  # fmt: skip
    finally:
        stop_rest.set()
        await pool.stop()
        await redis.aclose()
    snap = pool.snapshot()
    out["fleet_stats"] = {k: snap["stats"].get(k, 0) for k in
                          ("connects", "disconnects", "telemetry_sent", "bytes_sent")}  # fmt: skip
    lag = out.get("steady", {}).get("lag_redis", {})
    out["target"] = {"devices": 10_000, "lag_p99_s": 2.0,
                     "met": s.devices >= 10_000 and (lag.get("p99_s") or 99) < 2.0}  # fmt: skip
    return {"scenario": "scale", "result": out, "timeline": timeline.rows,
            "lags": reader.phase_lags.get("steady", [])}  # fmt: skip


async def _kill_broker(env: Env, pool: FleetPool, s: ScaleSettings, addr: tuple[str, int],
                       sample: Any, lags: dict[str, list[float]]) -> dict[str, Any]:  # fmt: skip
    """Stop the broker at ``addr`` (started by the stack); measured: time until its devices
    have all failed over (no session left on it, every device connected elsewhere), the
    telemetry lag meanwhile."""
    from stack.mqtt import Mosquitto

    srv = next(x for x in env.launcher.servers
               if isinstance(x, Mosquitto) and (x.host, x.port) == addr)  # fmt: skip
    moved = pool.snapshot()["per_broker"][-1]
    t = time.monotonic()
    await asyncio.to_thread(srv.stop)
    done: float | None = None
    while time.monotonic() - t < s.storm_timeout_s:
        row = await sample("broker_kill")
        snap = pool.snapshot()
        if snap["per_broker"][-1] == 0 and row["connected"] >= s.devices:
            done = round(time.monotonic() - t, 2)
            break
        await asyncio.sleep(0.5)
    return {"broker": f"{addr[0]}:{addr[1]}", "devices_on_it": moved, "all_failed_over_s": done,
            "sessions_per_broker_after": pool.snapshot()["per_broker"],
            "lag_redis": _lag_stats(lags.get("broker_kill", [])),
            "failovers": pool.snapshot()["stats"].get("failovers", 0)}  # fmt: skip


def _per_broker(brokers: list[tuple[str, int]], steady: dict[str, Any],
                resources: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One row per broker: its sessions in the steady phase, CPU share (steady phase and
    whole run), peak RSS."""
    rows = []
    for i, (host, port) in enumerate(brokers):
        name = f"mosquitto-{i}" if len(brokers) > 1 else "mosquitto"
        res = resources.get(name, {})
        rows.append({"broker": f"{host}:{port}", "sessions": steady["sessions_per_broker"][i],
                     "cpu_share_steady": steady["process_cpu_steady"].get(name),
                     "cpu_share_run": res.get("cpu_share"),
                     "rss_mb_peak": res.get("rss_mb_peak")})  # fmt: skip
    return rows


async def _redis_info(url: str) -> dict[str, Any]:
    """INFO, as the operator's user where the stack has one (the coordinator's ACL user may
    not run it); "unavailable" with the reason otherwise (an external Redis's user)."""
    r = redis_client(url)
    try:
        info = await r.info()
    except ResponseError as exc:
        return {"unavailable": str(exc)}
    finally:
        await r.aclose()
    return {k: info.get(k) for k in ("used_memory_human", "instantaneous_ops_per_sec",
                                     "connected_clients", "total_commands_processed")}  # fmt: skip


def scale_report(res: dict[str, Any], out_dir: Any) -> tuple[dict[str, Any], list[str], list[Any]]:
    from loadtest import report

    r = res["result"]
    rows = res["timeline"]
    plots = [
        report.plot_states(rows, out_dir / "devices_by_state.png", "Devices by state (scale)"),
        report.plot_rate(rows, "telemetry_sent", out_dir / "telemetry_per_s.png",
                         "Telemetry messages/s (fleet)", "msgs/s"),
    ]  # fmt: skip
    if res["lags"]:
        plots.append(report.plot_lag_hist(res["lags"], out_dir / "lag_hist.png"))
    st = r.get("steady", {})
    lag = st.get("lag_redis", {})
    rest = st.get("lag_rest_sampled", {})
    cs, rs = r.get("connect_storm", {}), r.get("reconnect_storm", {})
    ok = cs.get("all_connected_s") is not None and rs.get("all_reconnected_s") is not None
    summary = {"scenario": "scale", "ok": ok, **r, "timeline": rows}
    headline = [
        f"scale: {r['devices']} devices ({r.get('device_mode')}) in {r['processes']} processes; "
        f"connect storm {cs.get('all_connected_s')} s, online at coordinator "
        f"{cs.get('all_online_at_coordinator_s')} s later",
        f"steady: {st.get('telemetry_msgs_per_s')} msgs/s; lag p50 {lag.get('p50_s')} s, "
        f"p99 {lag.get('p99_s')} s (n={lag.get('samples')}); REST-sampled p50 "
        f"{rest.get('p50_s')} s, p99 {rest.get('p99_s')} s",
        f"reconnect storm: all reconnected in {rs.get('all_reconnected_s')} s",
        *([f"broker kill: {r['broker_kill']['devices_on_it']} devices failed over in "
           f"{r['broker_kill']['all_failed_over_s']} s"] if "broker_kill" in r else []),
        *(f"broker {b['broker']}: {b['sessions']} sessions, CPU {b['cpu_share_steady']} "
          f"(steady), RSS {b['rss_mb_peak']} MB" for b in r.get("brokers", [])),
    ]
    report.write(out_dir, summary, headline, plots)
    return summary, headline, plots
