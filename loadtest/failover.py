"""``failover``: ``kill -9`` of aggregators (or of Redis) mid-job; every acknowledged
update is applied exactly once on every shard.

``--fault aggregator`` (default) kills aggregators in turn; ``--fault redis`` kills
redis-server and starts it again on the same port and directory (it comes back with its
append-only file); ``--fault redis-wipe`` also deletes its data, so Redis comes back
empty and the coordinator must restore the job from its journal. For Redis faults each
row also says how long after Redis came up the job was served again (``job_back_s``) and
new updates were accepted again (``resumed_s``).

Phases: warm-up until the job has applied ``warmup_updates`` on every shard; then
``kills`` times: ``kill -9`` one aggregator (round robin), leave it down ``down_s`` (longer
than the consumer-group session timeout, so a survivor takes its partitions over and
catches up on records whose bases are the dead shard's last announcement), restart it and
run ``between_s``; then stop the job and the fleet, let the aggregators drain, stop them
gracefully (final checkpoints) and compare three ledgers per shard:

* ``log``: update ids on the shard's ``fl.updates`` partition (what the coordinator
  acknowledged, or was about to: it produces before it acks);
* ``acked``: update ids the devices saw acknowledged ``accepted`` / ``duplicate``;
* ``applied``: the applied-id window of the shard's final checkpoint, and its count.

Lost on a shard = acked or logged ids it did not apply; doubled = applications beyond
its distinct ids; every shard must hold the same set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator import checkpoint as ck
from aggregator.checkpoint import FileCheckpointStore
from loadtest.runner import Env, Progress, Timeline
from loadtest.train import TrainSettings, job_body
from schemas.errors import SchemaError
from schemas.kafka_auth import KafkaTarget, as_kwargs
from schemas.messages import ShardUpdate, decode
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.load_services import wait_quiet
from sim.pool import FleetPool
from stack.errors import StackError
from stack.redis import RedisServer


@dataclass(frozen=True, kw_only=True)
class FailoverSettings:
    devices: int = 120
    concurrency: int = 30
    aggregators: int = 2  # also the job's shard count
    kills: int = 2
    warmup_updates: int = 100  # applied on every shard before the first kill
    down_s: float = 20.0  # a killed aggregator stays down this long
    between_s: float = 15.0  # after a restart, before the next kill / the end
    session_timeout_ms: int = 6000
    fault: str = "aggregator"  # aggregator | redis | redis-wipe
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise StackError(f"failover: --fault must be one of {', '.join(FAULTS)}")


FAULTS = ("aggregator", "redis", "redis-wipe")


def aggregator_args(s: FailoverSettings) -> tuple[str, ...]:
    return (
        "--session-timeout-ms", str(s.session_timeout_ms),
        "--heartbeat-interval-ms", str(max(300, s.session_timeout_ms // 6)),
        "--checkpoint-interval-s", "2.0",
    )  # fmt: skip


async def log_index(bootstrap: KafkaTarget, topic: str, shards: int,
                    job_id: str) -> list[dict[str, int]]:  # fmt: skip
    """Per partition of ``topic``, up to its current end: ``job_id``'s update ids and the
    timestamp (ms) of the first record of each."""
    c = AIOKafkaConsumer(
        **as_kwargs(bootstrap),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=64 << 20,
    )
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(shards)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out: list[dict[str, int]] = [{} for _ in tps]

        async def behind() -> bool:
            return any([await c.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for tp, recs in (await c.getmany(*tps, timeout_ms=1000)).items():
                for r in recs:
                    try:
                        u = decode(r.value or b"", ShardUpdate, max_bytes=64 << 20)
                    except SchemaError:
                        continue
                    if u.job_id == job_id:
                        out[tp.partition].setdefault(u.update_id, int(r.timestamp))
        return out
    finally:
        await c.stop()


def applied_ids(ckpt_dir: Path, topic: str, shards: int, job_id: str) -> list[dict[str, Any]]:
    """Per shard: the final checkpoint's applied ids and the job's applied/rejected counts."""
    store = FileCheckpointStore(ckpt_dir)
    out: list[dict[str, Any]] = []
    for s in range(shards):
        blob = store.load(f"{topic}-{s}")
        if blob is None:
            raise StackError(f"no checkpoint for {topic}-{s} in {ckpt_dir}")
        cp = ck.loads(blob)
        jobs = [j for j in cp.jobs if j.job_id == job_id]
        count = jobs[0].applied if jobs else 0
        rejected = jobs[0].rejected if jobs else 0
        out.append({"ids": set(cp.applied_ids), "count": count, "rejected": rejected,
                    "version": jobs[0].version if jobs else 0})  # fmt: skip
    return out


def ledger(acked: set[str], logs: list[set[str]], applied: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the three ledgers (pure)."""
    per_shard = []
    for s, (log, a) in enumerate(zip(logs, applied, strict=True)):
        ids: set[str] = a["ids"] & (log | acked)
        per_shard.append({
            "shard": s,
            "logged": len(log),
            "applied": len(ids),
            "lost_acked": len(acked - ids),
            "lost_logged": len(log - ids),
            "applied_not_logged": len(a["ids"] - log),
            "doubled": max(0, int(a["count"]) - len(a["ids"])),
            "rejected_after_ack": int(a["rejected"]),
            "version": int(a["version"]),
        })  # fmt: skip
    sets = [a["ids"] for a in applied]
    return {
        "acked": len(acked),
        "acked_not_logged": len(acked - set().union(*logs)) if logs else len(acked),
        "shards": per_shard,
        "shards_agree": all(x == sets[0] for x in sets),
        "lost": sum(r["lost_acked"] + r["lost_logged"] for r in per_shard),
        "doubled": sum(r["doubled"] for r in per_shard),
    }


def refused(stats: dict[str, int]) -> dict[str, int]:
    """Uploads the coordinator refused before acknowledging, by reason (job stats)."""
    skip = ("accepted", "applied", "rejected")
    return {k[8:]: v for k, v in stats.items() if k.startswith("updates_") and k[8:] not in skip}


def fault_job(concurrency: int, seed: int, shards: int, run_id: str) -> dict[str, Any]:
    """The job the fault scenarios train: FedAsync on ``shards`` shards, one per
    aggregator, ``max_staleness`` at the product default."""
    body = job_body(TrainSettings(concurrency=concurrency, seed=seed), "fedasync", run_id)
    body["shards"] = shards
    body["strategy"].pop("max_staleness", None)
    return body


async def run_failover(env: Env, s: FailoverSettings, *, quiet: bool) -> dict[str, Any]:
    key = await env.api.public_key()
    body = fault_job(s.concurrency, s.seed, s.aggregators, env.run_id)
    spec = FleetSpec(devices=s.devices, seed=s.seed, id_prefix=f"fo{env.run_id}",
                     reconnect_max_s=5.0)  # fmt: skip
    enrolled = await enrol_if_secure(env.http, env.services, spec.device_ids())
    pool = FleetPool(spec, processes=1, mqtt_host=env.info.mqtt_host,
                     mqtt_port=env.info.mqtt_port, api_url=env.services.rest_url,
                     public_key_hex=key, log_dir=env.workdir,
                     credentials=enrolled.credentials, ca_file=enrolled.ca_file)  # fmt: skip
    svc = env.services
    timeline = Timeline()
    kills: list[dict[str, Any]] = []
    total = 30 + s.kills * (s.down_s + s.between_s) + 40
    try:
        with Progress("failover", total, quiet=quiet) as bar:
            t0 = time.monotonic()

            async def job_view() -> dict[str, Any]:
                view: dict[str, Any] = await env.api.get(f"/v1/jobs/{job_id}")
                return view

            async def tick(phase: str) -> dict[str, Any]:
                try:
                    view = await job_view()
                except Exception as exc:  # a Redis fault: the API answers 503 meanwhile
                    if s.fault == "aggregator" or not phase.startswith(("down", "up")):
                        raise
                    bar.update(time.monotonic() - t0, f"{phase}: API unavailable "
                               f"({str(exc)[:60]})", phase)  # fmt: skip
                    return {}
                applied = [sh["updates_applied"] for sh in view.get("shards", [])]
                timeline.add(phase=phase, accepted=view.get("updates_accepted", 0),
                             applied_min=min(applied, default=0),
                             applied_max=max(applied, default=0))  # fmt: skip
                bar.update(time.monotonic() - t0, f"{phase}: accepted="
                           f"{view.get('updates_accepted', 0)} applied/shard={applied}",
                           phase)  # fmt: skip
                return view

            async def phase(name: str, seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await tick(name)
                    await asyncio.sleep(1.0)

            await pool.start()
            job_id = (await env.api.create_job(body))["job_id"]
            warm = time.monotonic()
            while True:
                view = await tick("warmup")
                applied = [sh["updates_applied"] for sh in view.get("shards", [])]
                if min(applied, default=0) >= s.warmup_updates:
                    break
                if time.monotonic() - warm > 120:
                    raise StackError(f"failover: warm-up never reached {s.warmup_updates}")
                await asyncio.sleep(0.5)
            for k in range(s.kills):
                before = (await job_view())["updates_accepted"]
                if s.fault == "aggregator":
                    row = await kill_aggregator(env, k, s, phase)
                else:
                    row = await kill_redis(env, k, s, phase, job_view, before)
                kills.append({**row, "accepted_before": before})
                svc.check_alive()
            await env.api.stop_job(job_id)
            await pool.stop()
            acked = pool.acked_ids()
            await wait_quiet(env.http, svc.metrics_ports, quiet_s=3.0, timeout_s=60.0)
            view = await job_view()
    finally:
        await pool.stop()
    svc.stop_aggregators()  # SIGTERM: final checkpoints
    topic = f"{svc.topic_prefix}updates"
    logs = [set(ids) for ids in
            await log_index(env.info.kafka_kwargs(), topic, s.aggregators, job_id)]  # fmt: skip
    applied = await asyncio.to_thread(
        applied_ids, svc.workdir / "checkpoints", topic, s.aggregators, job_id
    )
    led = ledger(acked, logs, applied)
    stats = view.get("stats", {})
    result = {
        "devices": s.devices,
        "aggregators": s.aggregators,
        "fault": s.fault,
        "kills": kills,
        "updates_accepted": int(view.get("updates_accepted", 0)),
        "refused_before_ack": refused(stats),
        "rest_shards": view.get("shards", []),
        **led,
    }
    ok = (led["lost"] == 0 and led["doubled"] == 0 and led["shards_agree"]
          and led["acked"] > 0 and len(kills) == s.kills
          and all(r["rejected_after_ack"] == 0 and r["applied_not_logged"] == 0
                  for r in led["shards"]))  # fmt: skip
    return {"scenario": "failover", "ok": ok, "result": result, "timeline": timeline.rows}


Phase = Callable[[str, float], Awaitable[None]]


async def kill_aggregator(env: Env, k: int, s: FailoverSettings, phase: Phase) -> dict[str, Any]:
    svc = env.services
    i = k % len(svc.aggregators)
    victim = svc.aggregators[i]
    if victim.pid is None:
        raise StackError(f"aggregator {i} is not running")
    os.kill(victim.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    await phase(f"down{k}", s.down_s)
    down = time.monotonic() - t_kill
    svc.restart_aggregator(i)
    await phase(f"up{k}", s.between_s)
    return {"fault": "aggregator", "aggregator": i, "down_s": round(down, 1)}


async def kill_redis(
    env: Env, k: int, s: FailoverSettings, phase: Phase,
    job_view: Callable[[], Awaitable[dict[str, Any]]], before: int,
) -> dict[str, Any]:  # fmt: skip
    srv = env.launcher.local(RedisServer)
    if srv is None or srv.proc is None or srv.proc.pid is None:
        raise StackError("failover --fault redis needs the embedded stack's redis-server")
    os.kill(srv.proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    popen = srv.proc.proc
    if popen is not None:
        await asyncio.to_thread(popen.wait, 10)
    if s.fault == "redis-wipe":  # the disk is gone too: Redis comes back empty
        shutil.rmtree(srv.workdir, ignore_errors=True)
        srv.workdir.mkdir(parents=True)
    await phase(f"down{k}", s.down_s)
    down = time.monotonic() - t_kill
    srv.start()
    await asyncio.to_thread(srv.wait_ready)
    t_up = time.monotonic()
    back = resumed = None
    while time.monotonic() - t_up < max(60.0, s.between_s):
        with contextlib.suppress(Exception):  # 503 while the job is not back yet
            view = await job_view()
            if back is None and view.get("job_id"):
                back = time.monotonic() - t_up
            if back is not None and view.get("updates_accepted", 0) > 0 and (
                s.fault == "redis-wipe" or view["updates_accepted"] > before
            ):
                resumed = time.monotonic() - t_up
                break
        await asyncio.sleep(0.2)
    rest = s.between_s - (time.monotonic() - t_up)
    if rest > 0:
        await phase(f"up{k}", rest)
    return {"fault": s.fault, "down_s": round(down, 1),
            "job_back_s": None if back is None else round(back, 2),
            "resumed_s": None if resumed is None else round(resumed, 2)}  # fmt: skip


def failover_report(
    res: dict[str, Any], out_dir: Path
) -> tuple[dict[str, Any], list[str], list[Path]]:
    from loadtest import report

    r, rows = res["result"], res["timeline"]
    plots = [
        report.plot_rate(
            rows,
            "applied_min",
            out_dir / "updates_per_s.png",
            "Updates applied on every shard per second",
            "updates/s",
        )
    ]
    summary = {"scenario": "failover", "ok": res["ok"], **r, "timeline": rows}
    per = ", ".join(
        f"shard {x['shard']}: applied {x['applied']}/{x['logged']} logged, lost "
        f"{x['lost_acked'] + x['lost_logged']}, doubled {x['doubled']}, rejected after ack "
        f"{x['rejected_after_ack']}"
        for x in r["shards"]
    )
    fault = r.get("fault", "aggregator")
    victims = f"{r['aggregators']} aggregators" if fault == "aggregator" else fault
    backs = [f"back {x['job_back_s']} s, resumed {x['resumed_s']} s after Redis was up"
             for x in r["kills"] if "job_back_s" in x]  # fmt: skip
    headline = [
        f"failover: {len(r['kills'])} kill -9 of {victims}; updates accepted "
        f"{r['updates_accepted']}, acked to devices {r['acked']}"
        + (f"; {'; '.join(backs)}" if backs else ""),
        f"{per}; shards agree: {r['shards_agree']}; ok={res['ok']}",
    ]
    report.write(out_dir, summary, headline, plots)
    return summary, headline, plots
