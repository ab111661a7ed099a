"""Per-component costs for the capacity model (docs/scaling.md), on the real servers.

Each subcommand starts its own stack (``stack.LocalStack``: Apache Kafka, Mosquitto,
Redis), measures one component, stops everything and prints one JSON object. The load
generator (MQTT publishers, HTTP clients) runs in a child process, so the CPU time read
for the component under test is that component's own (``time.process_time`` of this
process for the in-process coordinator, ``/proc/<pid>/stat`` for the servers, Redis
``INFO commandstats`` deltas for its commands). CPU seconds per operation, not
wall-clock rates, are the figures to use: the machine is shared.

    .venv/bin/python bench/capacity.py ingest [--devices 5000] [--messages 60000]
    .venv/bin/python bench/capacity.py state [--sizes 10000,100000] [--concurrency 100]
    .venv/bin/python bench/capacity.py pulls [--hidden 1270] [--requests 400]

Numbers are written down in BENCHMARKS.md ("Capacity model inputs"), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.worker import rss_mb

_CLK = os.sysconf("SC_CLK_TCK")
_SELF = str(Path(__file__).resolve())


# ---- pure helpers (tests/test_capacity_bench.py) ------------------------------------


def proc_cpu_s(stat_line: str) -> float:
    """User + system CPU seconds from one ``/proc/<pid>/stat`` line (pure)."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def calls_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Per-command call counts between two ``INFO commandstats`` replies (pure);
    ``info``/``config``/``memory`` (the bench's own probes) are left out."""
    out: dict[str, int] = {}
    for key, val in after.items():
        name = key.removeprefix("cmdstat_")
        if name in ("info", "config", "memory"):
            continue
        d = int(val["calls"]) - int(before.get(key, {}).get("calls", 0))
        if d:
            out[name] = d
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def per(total: float, n: int, scale: float = 1.0) -> float | None:
    """``total / n * scale`` rounded to 3 significant-ish decimals; None when n is 0."""
    return round(total / n * scale, 3) if n else None


# ---- probes --------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return proc_cpu_s(f.read())
    except (OSError, IndexError, ValueError):
        return 0.0


def server_pid(info: Any, comm: str) -> int:
    for pid in info.pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith(comm):
                    return int(pid)
        except OSError:
            continue
    return 0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class RedisProbe:
    """INFO-based deltas on the stack's Redis (its admin user when it has one)."""

    def __init__(self, info: Any) -> None:
        from redis.asyncio import Redis

        self.r: Any = Redis.from_url(info.redis_admin_url or info.redis_url)
        self.pid = server_pid(info, "redis-server")

    async def snap(self) -> dict[str, Any]:
        return {"cmd": await self.r.info("commandstats"),
                "mem": int((await self.r.info("memory"))["used_memory"]),
                "cpu": cpu_of(self.pid)}  # fmt: skip

    async def since(self, s0: dict[str, Any]) -> dict[str, Any]:
        s1 = await self.snap()
        calls = calls_delta(s0["cmd"], s1["cmd"])
        return {"calls": calls, "calls_total": sum(calls.values()),
                "mem_bytes": s1["mem"] - s0["mem"], "cpu_s": s1["cpu"] - s0["cpu"]}  # fmt: skip

    async def aclose(self) -> None:
        await self.r.aclose()


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


async def _child(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, _SELF, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child {args[0]} exited {proc.returncode}")
    res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return res


# ---- ingest: coordinator CPU per telemetry message -----------------------------------


async def ingest(info: Any, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.service import Coordinator
    from coordinator.settings import CoordinatorSettings

    prefix = f"cap{time.time_ns() % 10**8}."
    s = CoordinatorSettings(
        kafka_bootstrap=info.kafka_bootstrap, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
        redis_url=info.redis_url, topic_prefix=prefix, model_store_dir=tmp / "m",
        signing_key_path=tmp / "k", task_key_path=tmp / "tk", http_port=0,
    )  # fmt: skip
    probe = RedisProbe(info)
    mosq = server_pid(info, "mosquitto")
    got = 0
    async with Coordinator(s, metrics=CoordinatorMetrics(registry=_registry())) as coord:
        orig = coord.router.handle

        async def counted(topic: str, payload: bytes) -> None:
            nonlocal got
            await orig(topic, payload)
            got += 1

        coord.router.handle = counted  # type: ignore[method-assign]
        await asyncio.sleep(2.0)  # subscriptions settle
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(a.idle_s)  # the coordinator's own loops with no traffic
        idle_cores = (time.process_time() - c0) / (time.monotonic() - t0)
        r0, m0 = await probe.snap(), cpu_of(mosq)
        c0, t0, la0 = time.process_time(), time.monotonic(), loadavg()
        pub = await _child("_publish", info.mqtt_host, str(info.mqtt_port), str(a.devices),
                           str(a.messages), str(a.publishers))  # fmt: skip
        last = -1
        while got != last and got < a.messages:  # drain: until no progress for 1 s
            last = got
            await asyncio.sleep(1.0)
        await coord.batcher.flush()
        wall = time.monotonic() - t0
        cpu = time.process_time() - c0
        red, mcpu = await probe.since(r0), cpu_of(mosq) - m0
        coord_rss = rss_mb(os.getpid())
    await probe.aclose()
    net = cpu - idle_cores * wall
    return {
        "devices": a.devices, "messages_sent": a.messages, "received": got,
        "publisher": pub, "wall_s": round(wall, 2), "msgs_per_s_wall": round(got / wall),
        "coord_cpu_s": round(cpu, 3), "coord_idle_cores": round(idle_cores, 4),
        "coord_us_per_msg": per(cpu, got, 1e6), "coord_us_per_msg_net_of_idle": per(net, got, 1e6),
        "coord_rss_mb": round(coord_rss, 1),
        "mosquitto_cpu_s": round(mcpu, 3),
        "mosquitto_us_per_msg_in_and_out": per(mcpu, got, 1e6),
        "redis_cpu_s": round(red["cpu_s"], 3), "redis_us_per_msg": per(red["cpu_s"], got, 1e6),
        "redis_calls_per_msg": per(red["calls_total"], got), "redis_calls": red["calls"],
        "loadavg_start": la0, "loadavg_end": loadavg(),
    }  # fmt: skip


async def publish_child(host: str, port: int, devices: int, n: int, publishers: int) -> None:
    import aiomqtt

    from schemas.messages import Telemetry, encode

    now = time.time()
    payloads = [
        (f"fleet/c{i % devices}/telemetry",
         encode(Telemetry(device_id=f"c{i % devices}", ts=now, battery=50.0, charging=False,
                          network="wifi", metered=False, seq=i)))
        for i in range(n)
    ]  # fmt: skip

    async def one(part: list[tuple[str, bytes]]) -> None:
        async with aiomqtt.Client(host, port) as c:
            for topic, p in part:
                await c.publish(topic, p, qos=0)

    t0 = time.monotonic()
    await asyncio.gather(*(one(payloads[i::publishers]) for i in range(publishers)))
    print(json.dumps({"sent": n, "payload_bytes": len(payloads[0][1]),
                      "publish_s": round(time.monotonic() - t0, 2)}))  # fmt: skip


# ---- state: Redis bytes and commands per device and task; one selection pass ----------


class _CaptureProducer:
    """Kafka stand-in that records each task record's size (acks at once)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def send_and_wait(self, topic: str, value: bytes, **kw: Any) -> None:
        self.sizes.append(len(value))


async def state(info: Any, a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from redis.asyncio import Redis

    from coordinator.fleet import HISTORY, FleetStore
    from coordinator.jobs import JobStore, build_job
    from coordinator.jobstats import JobStatsStore
    from coordinator.keys import Keys
    from coordinator.lock import RedisLock
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.rounds import RoundStore
    from coordinator.selector import Selector
    from coordinator.settings import CoordinatorSettings
    from coordinator.task_sink import KafkaTaskSink
    from coordinator.tasks import TaskStore
    from schemas.messages import Telemetry

    probe = RedisProbe(info)
    r: Any = Redis.from_url(info.redis_url, decode_responses=True)
    nets: list[Literal["wifi", "cellular", "ethernet"]] = ["wifi", "cellular", "ethernet"]
    rows = []
    for size in a.sizes:
        prefix = f"cst{time.time_ns() % 10**8}:"
        st = CoordinatorSettings(redis_url=info.redis_url, redis_prefix=prefix,
                                 pace_enabled=False, telemetry_ttl_s=3600.0,
                                 http_port=0)  # fmt: skip
        fleet = FleetStore(r, prefix, st.telemetry_ttl_s)
        tasks, jobs = TaskStore(r, prefix), JobStore(r, prefix)
        rng = np.random.default_rng(0)
        row: dict[str, Any] = {"devices": size, "loadavg_start": loadavg()}
        # telemetry: one batch of 500 distinct devices per script, as the batcher writes
        s0, c0 = await probe.snap(), time.process_time()
        now = time.time()
        batch: list[Telemetry] = []
        for i in range(size):
            batch.append(Telemetry(device_id=f"s{i}", ts=now, battery=float(rng.uniform(0, 100)),
                                   charging=bool(rng.random() < 0.3), network=nets[i % 3],
                                   metered=bool(rng.random() < 0.3)))  # fmt: skip
            if len(batch) >= 500:
                await fleet.write_telemetry(batch, now)
                batch = []
        if batch:
            await fleet.write_telemetry(batch, now)
        cpu = time.process_time() - c0
        d = await probe.since(s0)
        row["telemetry_first_write"] = {
            "redis_bytes_per_device": per(d["mem_bytes"], size),
            "redis_calls_per_device": per(d["calls_total"], size), "calls": d["calls"],
            "redis_us_per_device": per(d["cpu_s"], size, 1e6),
            "client_us_per_device": per(cpu, size, 1e6),
        }  # fmt: skip
        # a second report from every device (the steady state: keys exist already)
        s0, c0 = await probe.snap(), time.process_time()
        now = time.time()
        for i in range(0, size, 500):
            await fleet.write_telemetry(
                [Telemetry(device_id=f"s{j}", ts=now, battery=60.0, charging=True,
                           network="wifi", metered=False) for j in range(i, min(size, i + 500))],
                now,
            )  # fmt: skip
        cpu = time.process_time() - c0
        d = await probe.since(s0)
        row["telemetry_update"] = {
            "redis_bytes_per_device": per(d["mem_bytes"], size),
            "redis_calls_per_msg": per(d["calls_total"], size), "calls": d["calls"],
            "redis_us_per_msg": per(d["cpu_s"], size, 1e6),
            "client_us_per_msg": per(cpu, size, 1e6),
        }  # fmt: skip
        job = build_job({"model_name": "cap", "concurrency": a.concurrency,
                         "spec": {"family": "softmax", "n_features": 4,
                                  "n_classes": 2}})  # fmt: skip
        await jobs.put(job)
        sink = _CaptureProducer()
        sel = Selector(settings=st, fleet=fleet, tasks=tasks, jobs=jobs,
                       rounds=RoundStore(r, prefix), stats=JobStatsStore(r, prefix),
                       lock=RedisLock(r, Keys(prefix).selector_lock),
                       task_sink=KafkaTaskSink(sink, st.tasks_topic), task_key=bytes(32),
                       publish=None, metrics=CoordinatorMetrics(registry=_registry()))  # fmt: skip
        issue: list[dict[str, float]] = []
        scan: list[dict[str, float]] = []
        mem_task = mem_hist = 0
        for _ in range(a.passes):
            s0, c0, t0 = await probe.snap(), time.process_time(), time.perf_counter()
            out = await sel.select_once(time.time())
            w, cpu = time.perf_counter() - t0, time.process_time() - c0
            d = await probe.since(s0)
            n = len(out[job.spec.job_id])
            issue.append({"tasks": n, "wall_ms": w * 1e3, "cpu_ms": cpu * 1e3,
                          "redis_calls": d["calls_total"],
                          "redis_ms": d["cpu_s"] * 1e3})  # fmt: skip
            mem_task += d["mem_bytes"]
            s0, c0, t0 = await probe.snap(), time.process_time(), time.perf_counter()
            await sel.select_once(time.time())
            w, cpu = time.perf_counter() - t0, time.process_time() - c0
            d = await probe.since(s0)
            scan.append({"wall_ms": w * 1e3, "cpu_ms": cpu * 1e3,
                         "redis_calls": d["calls_total"],
                         "redis_ms": d["cpu_s"] * 1e3})  # fmt: skip
            s0 = await probe.snap()
            for tid in await tasks.leased(job.spec.job_id):  # as if every task uploaded
                rec = await tasks.get(tid)
                assert rec is not None
                await fleet.release_task(rec.device_id, tid, contributed=True, outcome="uploaded")
            await r.delete(Keys(prefix).leases(job.spec.job_id))
            mem_hist += (await probe.since(s0))["mem_bytes"]
        ntasks = sum(int(x["tasks"]) for x in issue)

        def med(xs: list[dict[str, float]], k: str) -> float:
            return round(float(np.median([x[k] for x in xs])), 2)

        row["selection"] = {
            "concurrency": a.concurrency, "passes": a.passes, "tasks_issued": ntasks,
            **{f"issue_{k}_median": med(issue, k) for k in issue[0]},
            **{f"scan_{k}_median": med(scan, k) for k in scan[0]},
            "redis_bytes_per_task_issued": per(mem_task, ntasks),
            "redis_bytes_per_release": per(mem_hist, ntasks),
            "task_record_bytes_kafka": round(float(np.mean(sink.sizes)), 1) if sink.sizes else None,
        }  # fmt: skip
        # a full participation history (HISTORY entries) on a sample of devices
        sample = [f"s{i}" for i in range(size - min(size, a.history_devices), size)]
        s0 = await probe.snap()
        for k in range(HISTORY):
            for j in range(0, len(sample), 16):  # 16 at once: within the pool of connections
                await asyncio.gather(*(
                    fleet.release_task(dev, f"h{k}", contributed=True, outcome="uploaded")
                    for dev in sample[j : j + 16]
                ))  # fmt: skip
        d = await probe.since(s0)
        n_rel = len(sample) * HISTORY
        row["history"] = {"devices": len(sample), "entries": HISTORY,
                          "redis_bytes_per_device_full": per(d["mem_bytes"], len(sample)),
                          "redis_calls_per_release": per(d["calls_total"], n_rel)}  # fmt: skip
        row["loadavg_end"] = loadavg()
        keys = [k async for k in r.scan_iter(f"{prefix}*", count=10000)]
        for i in range(0, len(keys), 10000):
            await r.delete(*keys[i : i + 10000])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    await r.aclose()
    await probe.aclose()
    return {"rows": rows}


# ---- pulls: REST CPU per model pull ---------------------------------------------------


async def pulls(info: Any, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from coordinator.link import MemoryFleetLink
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.service import Coordinator
    from coordinator.settings import CoordinatorSettings
    from coordinator.task_sink import DirectTaskSink

    prefix = f"cpl{time.time_ns() % 10**8}."
    s = CoordinatorSettings(
        kafka_bootstrap=info.kafka_bootstrap, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
        redis_url=info.redis_url, topic_prefix=prefix, model_store_dir=tmp / "pm",
        signing_key_path=tmp / "k", task_key_path=tmp / "tk", admin_token="b", http_port=0,
    )  # fmt: skip
    out: dict[str, Any] = {"hidden": a.hidden, "concurrency": a.concurrency}
    async with Coordinator(s, metrics=CoordinatorMetrics(registry=_registry()),
                           link=MemoryFleetLink(), task_sink=DirectTaskSink) as coord:  # fmt: skip

        async def _noop(_spec: Any) -> None:
            return None

        coord.app_state.publish_job = _noop
        url = coord.rest_url
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model_name": "cap", "shards": 4,
                    "spec": {"family": "mlp", "n_features": 784, "n_classes": 10,
                             "hidden": a.hidden}}  # fmt: skip
            (await http.post("/v1/jobs", json=body, headers={"Authorization": "Bearer b"})
             ).raise_for_status()  # fmt: skip
            w = await http.get("/v1/models/cap/versions/0/weights")
            o = await http.get("/v1/models/cap/latest.onnx")  # first: export, then cached
            out["weights_bytes"], out["onnx_bytes"] = len(w.content), len(o.content)
            cases = {"weights": ("/v1/models/cap/versions/0/weights", ""),
                     "weights_304": ("/v1/models/cap/versions/0/weights", w.headers["etag"]),
                     "onnx": ("/v1/models/cap/latest.onnx", "")}  # fmt: skip
        for label, (path, etag) in cases.items():
            n = a.requests * (5 if etag else 1)
            c0, la0 = time.process_time(), loadavg()
            res = await _child("_pull", url + path, etag, str(n), str(a.concurrency))
            cpu = time.process_time() - c0
            out[label] = {"requests": n, "client": res, "pulls_per_s_wall": res["per_s"],
                          "server_cpu_s": round(cpu, 3), "server_ms_per_pull": per(cpu, n, 1e3),
                          "loadavg_start": la0, "loadavg_end": loadavg()}  # fmt: skip
    return out


async def pull_child(url: str, etag: str, n: int, conc: int) -> None:
    import httpx

    headers = {"If-None-Match": etag} if etag else {}
    want = 304 if etag else 200
    left = n
    nbytes = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal left, nbytes
        while left > 0:
            left -= 1
            resp = await http.get(url, headers=headers)
            assert resp.status_code == want, resp.status_code
            nbytes += len(resp.content)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=conc)) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(http) for _ in range(conc)))
        dt = time.monotonic() - t0
    print(json.dumps({"per_s": round(n / dt, 1), "wall_s": round(dt, 2),
                      "mb_per_s": round(nbytes / dt / 1e6, 1)}))  # fmt: skip


# ---- main -----------------------------------------------------------------------------


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    from stack import LocalStack, StackSettings

    with tempfile.TemporaryDirectory() as td:
        async with LocalStack(StackSettings.from_env()) as info:
            res: dict[str, Any] = {"stack": info.describe(), "cmd": a.cmd}
            if a.cmd == "ingest":
                res["ingest"] = await ingest(info, Path(td), a)
            elif a.cmd == "state":
                res["state"] = await state(info, a)
            else:
                res["pulls"] = await pulls(info, Path(td), a)
            return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        h, port, dev, n, pubs = sys.argv[2:7]
        asyncio.run(publish_child(h, int(port), int(dev), int(n), int(pubs)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_pull":
        url, etag, n, conc = sys.argv[2:6]
        asyncio.run(pull_child(url, etag, int(n), int(conc)))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ingest", help="coordinator CPU per telemetry message (via Mosquitto)")
    p.add_argument("--devices", type=int, default=5000)
    p.add_argument("--messages", type=int, default=60000)
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--idle-s", type=float, default=5.0)
    p = sub.add_parser("state", help="Redis bytes/commands per device and task; selection")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[10_000, 100_000])  # fmt: skip
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--history-devices", type=int, default=5000)
    p = sub.add_parser("pulls", help="coordinator CPU per model pull (REST)")
    p.add_argument("--hidden", type=int, default=1270, help="mlp 784-H-10 (1270: ~1.0M params)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(a))))


if __name__ == "__main__":
    main()
