"""``churn``: a share of the devices vanish mid-task or flap; nothing is stranded or lost.

Phases: warm-up until devices train; a churn window in which ``share`` of the devices
are dropped, busy ones first — half *vanish* (no clean disconnect, in-memory state lost,
a fresh agent with the same id returns later), half *flap* (network gone for a while,
the running task aborts, the abort cannot be delivered, the agent reconnects with its
outbox); a settle window; then the fleet shuts down and the job keeps running for one
more lease so every lease resolves.

Checks (from the coordinator's Redis task records and the aggregators' counters):

* stranded tasks = tasks still ``offered``/``accepted``/``uploading`` at the end (all
  devices gone, one lease later): must be 0. Expired tasks and re-issues are counted.
* lost updates = ``S × updates_accepted − chunks applied − chunks rejected (non-duplicate)``
  over the S shards: must be 0; chunks applied beyond ``S × accepted`` would be double
  applies. Every update id a device saw acked must be an ``uploaded`` task.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from loadtest.runner import Env, Progress, Timeline
from loadtest.train import TrainSettings, job_body
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.load_services import wait_quiet
from sim.pool import FleetPool
from sim.services import scrape

ACTIVE = ("offered", "accepted", "uploading")


@dataclass(frozen=True, kw_only=True)
class ChurnSettings:
    devices: int = 300
    share: float = 0.3
    duration_s: float = 30.0  # churn window
    settle_s: float = 10.0
    lease_s: float = 15.0
    offline_s: float = 5.0  # how long a dropped device stays away
    concurrency: int = 30
    processes: int = 1
    seed: int = 0


async def task_records(redis: Redis, prefix: str, job_id: str) -> list[dict[str, str]]:
    """Every task record of ``job_id`` (on a Redis Cluster ``scan_iter`` walks every
    primary; the records share the deployment's slot, so one of them holds them all)."""
    keys = [k async for k in redis.scan_iter(match=Keys(prefix).task_pattern, count=1000)]
    out: list[dict[str, str]] = []
    for i in range(0, len(keys), 1000):
        pipe = redis.pipeline(transaction=False)
        for k in keys[i : i + 1000]:
            pipe.hgetall(k)
        for h in await pipe.execute():
            if h.get("job_id") == job_id:
                out.append(h)
    return out


def task_summary(recs: list[dict[str, str]], now: float) -> dict[str, Any]:
    states: dict[str, int] = {}
    for h in recs:
        states[h.get("state", "?")] = states.get(h.get("state", "?"), 0) + 1
    active = [h for h in recs if h.get("state") in ACTIVE]
    overdue = [h for h in active if float(h.get("deadline_ts", "0") or 0) < now]
    return {"issued": len(recs), "by_state": states, "active": len(active),
            "stranded_overdue": len(overdue),
            "reissued": sum(1 for h in recs if h.get("reissue_of"))}  # fmt: skip


async def run_churn(env: Env, s: ChurnSettings, *, quiet: bool) -> dict[str, Any]:
    from edge_agent.data import load_digits_split

    train, _ = load_digits_split(seed=s.seed)
    _ = train
    key = await env.api.public_key()
    ts = TrainSettings(concurrency=s.concurrency, seed=s.seed)
    body = job_body(ts, "fedasync", env.run_id)
    body["strategy"]["max_staleness"] = 250
    spec = FleetSpec(devices=s.devices, seed=s.seed, time_scale=1.0, base_samples_per_s=10.0,
                     speed_sigma=1.0, telemetry_interval_s=2.0, id_prefix=f"ch{env.run_id}",
                     reconnect_max_s=5.0)  # fmt: skip
    enrolled = await enrol_if_secure(env.http, env.services, spec.device_ids())
    pool = FleetPool(spec, processes=s.processes, mqtt_host=env.info.mqtt_host,
                     mqtt_port=env.info.mqtt_port, api_url=env.services.rest_url,
                     public_key_hex=key, log_dir=env.workdir,
                     credentials=enrolled.credentials, ca_file=enrolled.ca_file)  # fmt: skip
    redis = redis_client(env.info.redis_url)  # a single Redis or a Redis Cluster
    prefix = env.services.redis_prefix
    ports = env.services.metrics_ports
    timeline = Timeline()
    shards = int(body["shards"])
    total = 10 + s.duration_s + s.settle_s + s.lease_s + 30
    try:
        with Progress("churn", total, quiet=quiet) as bar:
            t0 = time.monotonic()

            async def tick(phase: str) -> None:
                fleet = await env.api.get("/v1/fleet")
                counts = fleet.get("counts", {})
                snap = pool.snapshot()
                m = await scrape(env.http, ports)
                timeline.add(phase=phase, offline=counts.get("offline", 0),
                             idle=counts.get("idle", 0), training=counts.get("training", 0),
                             connected=snap["connected"], affected=snap["affected"],
                             applied=m.applied)  # fmt: skip
                bar.update(time.monotonic() - t0, f"{phase}: connected={snap['connected']} "
                           f"training={counts.get('training', 0)} dropped={snap['affected']} "
                           f"applied={m.applied:.0f}", phase)  # fmt: skip

            async def phase(name: str, seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    env.services.check_alive()
                    await tick(name)
                    await asyncio.sleep(1.0)

            m0 = await scrape(env.http, ports)
            await pool.start()
            job = await env.api.create_job(body)
            job_id = job["job_id"]
            warm = time.monotonic()
            while pool.snapshot()["busy"] < min(s.concurrency, s.devices) // 2:
                await tick("warmup")
                if time.monotonic() - warm > 60:
                    break
                await asyncio.sleep(0.5)
            await pool.broadcast({"cmd": "churn", "share": s.share, "window_s": s.duration_s,
                                  "offline_s": s.offline_s})  # fmt: skip
            await phase("churn", s.duration_s)
            await phase("settle", s.settle_s)
            await pool.stop()
            acked = pool.acked_ids()
            snap = pool.snapshot()
            await phase("drain", s.lease_s + 3.0)
            recs = await task_records(redis, prefix, job_id)
            tasks = task_summary(recs, time.time())
            m1 = await wait_quiet(env.http, ports, quiet_s=3.0, timeout_s=30.0)
            view = await env.api.get(f"/v1/jobs/{job_id}")
            await env.api.stop_job(job_id)
    finally:
        await pool.stop()
        await redis.aclose()
    d = m1.minus(m0)
    accepted = int(view.get("updates_accepted", 0))
    rejected_nondup = int(sum(v for k, v in d.rejected.items() if k != "duplicate"))
    applied = int(d.applied)
    lost = shards * accepted - applied - rejected_nondup
    by_id = {h.get("task_id", ""): h.get("state") for h in recs}
    acked_not_uploaded = sorted(i for i in acked if by_id.get(i) != "uploaded")
    result = {
        "devices": s.devices,
        "share": s.share,
        "dropped_devices": snap["affected"],
        "dropped_share": round(snap["affected"] / max(1, s.devices), 3),
        "churn_events": snap["churn"],
        "tasks": tasks,
        "stranded_tasks": tasks["active"],
        "tasks_expired": tasks["by_state"].get("expired", 0),
        "updates_accepted": accepted,
        "late_updates": int(view.get("stats", {}).get("late_updates", 0)),
        "shards": shards,
        "chunks_expected": shards * accepted,
        "chunks_applied": applied,
        "chunks_applied_by_shard": {k: int(v) for k, v in d.applied_by_shard.items()},
        "chunks_rejected": {k: int(v) for k, v in d.rejected.items() if v},
        "lost_updates": lost,
        "double_applied": max(0, -lost),
        "device_acked_unique": len(acked),
        "device_acked_not_uploaded": acked_not_uploaded[:20],
        "fleet_stats": snap["stats"],
    }
    ok = (tasks["active"] == 0 and lost == 0 and not acked_not_uploaded
          and snap["affected"] >= int(0.9 * s.share * s.devices))  # fmt: skip
    return {"scenario": "churn", "ok": ok, "result": result, "timeline": timeline.rows}


def churn_report(
    res: dict[str, Any], out_dir: Path
) -> tuple[dict[str, Any], list[str], list[Path]]:
    from loadtest import report

    r, rows = res["result"], res["timeline"]
    plots = [
        report.plot_states(rows, out_dir / "devices_by_state.png", "Devices by state (churn)"),
        report.plot_rate(rows, "applied", out_dir / "updates_per_s.png",
                         "Chunks applied per second", "chunks/s"),
    ]  # fmt: skip
    summary = {"scenario": "churn", "ok": res["ok"], **r, "timeline": rows}
    headline = [
        f"churn: {r['dropped_devices']}/{r['devices']} devices dropped ({r['churn_events']}); "
        f"tasks issued {r['tasks']['issued']}, expired {r['tasks_expired']}, re-issued "
        f"{r['tasks']['reissued']}, stranded {r['stranded_tasks']}",
        f"updates accepted {r['updates_accepted']} (late {r['late_updates']}); chunks "
        f"expected {r['chunks_expected']}, applied {r['chunks_applied']}, rejected "
        f"{r['chunks_rejected']}; lost {r['lost_updates']}; device acks not uploaded "
        f"{len(r['device_acked_not_uploaded'])}; ok={res['ok']}",
    ]
    report.write(out_dir, summary, headline, plots)
    return summary, headline, plots
