"""Coordinator benchmarks: ``.venv/bin/python bench/bench_coordinator.py [--json] [--quick]``.

1. Telemetry ingest: N telemetry messages published at QoS 0; in the same run a bare MQTT
   subscriber and the coordinator (MQTT -> decode -> Redis pipelines) both receive them.
   Reported: each side's messages/s and the ratio coordinator / bare subscriber.
2. Selection latency with D devices in Redis: p50/p99 of a pass that only scans (slots
   full) and of a pass that issues tasks (fresh slots; Kafka replaced by an in-memory
   producer so the number is the coordinator's own cost).
3. Model pulls/s over real HTTP (uvicorn): weights downloads with and without
   ``If-None-Match`` (304).
4. Upload ingest path (``--only uploads``): accepted uploads/s through
   ``UploadHandler.handle`` (check, decode, claim, produce, confirm, ack) on the real
   Redis, Kafka replaced by an in-memory producer; one at a time and 32 at once, with the
   Redis round trips counted per accepted upload. Only the coordinator's public objects
   are used, so the same file measures older trees too.

Numbers are written down in BENCHMARKS.md, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import httpx
import numpy as np
from redis.asyncio import Redis

from coordinator.core import build_core
from coordinator.jobs import build_job
from coordinator.link import MemoryFleetLink
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import EligibilityPolicy
from coordinator.selector import Selector
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.task_sink import DirectTaskSink, KafkaTaskSink
from coordinator.tasks import load_task_key
from schemas.messages import Telemetry, encode


class _NullProducer:
    async def send_and_wait(self, *a: Any, **kw: Any) -> None:
        return None

    async def send(self, *a: Any, **kw: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)  # "acked" at once: the figure is the coordinator's own cost
        return fut


class _RoundTrips:
    """Counts Redis requests on the wire (``send_packed_command``; a pipeline is one)."""

    def __init__(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.n = 0
        self._cls: Any = AbstractConnection
        self._orig = AbstractConnection.send_packed_command

    def __enter__(self) -> _RoundTrips:
        orig = self._orig

        async def counted(conn: Any, *a: Any, **kw: Any) -> None:
            self.n += 1
            await orig(conn, *a, **kw)

        self._cls.send_packed_command = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.send_packed_command = self._orig


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1000.0


async def bench_ingest(info: Any, tmp: Path, n_msgs: int, n_devices: int) -> dict[str, Any]:
    prefix = f"bench{time.time_ns() % 10**8}."
    s = CoordinatorSettings(
        kafka_bootstrap=info.kafka_bootstrap, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
        redis_url=info.redis_url, topic_prefix=prefix, model_store_dir=tmp / "m",
        signing_key_path=tmp / "k", task_key_path=tmp / "tk", http_port=0,
    )  # fmt: skip
    payloads = [
        (f"fleet/b{i % n_devices}/telemetry",
         encode(Telemetry(device_id=f"b{i % n_devices}", ts=time.time(), battery=50.0,
                          charging=False, network="wifi", metered=False, seq=i)))
        for i in range(n_msgs)
    ]  # fmt: skip
    bare: list[float] = []
    coord_times: list[float] = []
    async with Coordinator(s, metrics=CoordinatorMetrics(registry=_registry())) as coord:
        orig = coord.router.handle

        async def timed(topic: str, payload: bytes) -> None:
            await orig(topic, payload)
            coord_times.append(time.perf_counter())

        coord.router.handle = timed  # type: ignore[method-assign]
        async with aiomqtt.Client(
            info.mqtt_host, info.mqtt_port, max_queued_incoming_messages=0
        ) as sub:
            await sub.subscribe("fleet/+/telemetry", qos=0)

            async def read_bare() -> None:
                async for _ in sub.messages:
                    bare.append(time.perf_counter())
                    if len(bare) >= n_msgs:
                        return

            reader = asyncio.create_task(read_bare())

            async def publish(part: list[tuple[str, bytes]]) -> None:
                async with aiomqtt.Client(info.mqtt_host, info.mqtt_port) as pub:
                    for topic, p in part:
                        await pub.publish(topic, p, qos=0)

            n_pub = 4  # several publishers so the broker, not one client, sets the pace
            await asyncio.gather(*(publish(payloads[i::n_pub]) for i in range(n_pub)))
            last = -1
            while True:  # drain: stop when neither side made progress for 1 s
                await asyncio.sleep(1.0)
                cur = len(bare) + len(coord_times)
                if cur == last or (len(bare) >= n_msgs and len(coord_times) >= n_msgs):
                    break
                last = cur
            reader.cancel()
        await coord.batcher.flush()
        stored = len(await coord.fleet.live_ids())
        # ceiling of the coordinator's own path (decode -> batch -> Redis), no broker
        t = time.perf_counter()
        for i, (topic, p) in enumerate(payloads):
            await orig(topic, p)
            if i % s.telemetry_batch == 0:
                await coord.batcher.flush()
        await coord.batcher.flush()
        ceiling = len(payloads) / (time.perf_counter() - t)

    def rate(ts: list[float]) -> float:
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    r_bare, r_coord = rate(bare), rate(coord_times)
    return {
        "messages": n_msgs, "devices": n_devices,
        "bare_received": len(bare), "coord_received": len(coord_times),
        "bare_msgs_per_s": round(r_bare), "coord_msgs_per_s": round(r_coord),
        "ratio": round(r_coord / r_bare, 3) if r_bare else None,
        "devices_in_redis": stored,
        "coord_path_only_msgs_per_s": round(ceiling),
    }  # fmt: skip


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


async def bench_selection(redis_url: str, devices: int, passes: int) -> dict[str, Any]:
    from coordinator.fleet import FleetStore
    from coordinator.jobs import JobStore
    from coordinator.jobstats import JobStatsStore
    from coordinator.keys import Keys
    from coordinator.lock import RedisLock
    from coordinator.rounds import RoundStore
    from coordinator.tasks import TaskStore

    prefix = f"bsel{time.time_ns() % 10**8}:"
    r: Any = Redis.from_url(redis_url, decode_responses=True)
    s = CoordinatorSettings(
        redis_url=redis_url, redis_prefix=prefix, pace_enabled=False, telemetry_ttl_s=3600.0,
        http_port=0,
    )
    metrics = CoordinatorMetrics(registry=_registry())
    fleet = FleetStore(r, prefix, s.telemetry_ttl_s)
    tasks, jobs = TaskStore(r, prefix), JobStore(r, prefix)
    rng = np.random.default_rng(0)
    now = time.time()
    nets: list[Literal["wifi", "cellular", "ethernet"]] = ["wifi", "cellular", "ethernet"]
    batch = []
    t0 = time.perf_counter()
    for i in range(devices):
        batch.append(
            Telemetry(
                device_id=f"s{i}",
                ts=now,
                battery=float(rng.uniform(0, 100)),
                charging=bool(rng.random() < 0.3),
                network=nets[i % 3],
                metered=bool(rng.random() < 0.3),
            )
        )
        if len(batch) >= 5000:
            await fleet.write_telemetry(batch, now)
            batch = []
    await fleet.write_telemetry(batch, now)
    load_s = time.perf_counter() - t0
    job = build_job(
        {
            "model_name": "bm",
            "concurrency": 100,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
        }
    )
    await jobs.put(job)
    sel = Selector(
        settings=s,
        fleet=fleet,
        tasks=tasks,
        jobs=jobs,
        rounds=RoundStore(r, prefix),
        stats=JobStatsStore(r, prefix),
        lock=RedisLock(r, Keys(prefix).selector_lock),
        task_sink=KafkaTaskSink(_NullProducer(), s.tasks_topic),
        task_key=bytes(32),  # tokens are never pushed here
        publish=None,
        metrics=metrics,
    )
    issuing: list[float] = []
    scanning: list[float] = []
    for _ in range(passes):
        t = time.perf_counter()
        out = await sel.select_once(time.time())
        issuing.append(time.perf_counter() - t)
        assert len(out[job.spec.job_id]) == 100
        t = time.perf_counter()
        await sel.select_once(time.time())  # slots full: scan only
        scanning.append(time.perf_counter() - t)
        # free the slots again (as if all 100 uploaded) for the next issuing pass
        for tid in await tasks.leased(job.spec.job_id):
            rec = await tasks.get(tid)
            assert rec is not None
            await fleet.release_task(rec.device_id, tid, contributed=True)
        await r.delete(Keys(prefix).leases(job.spec.job_id))
    eligible = sum(EligibilityPolicy().eligible(v, time.time()) for v in await fleet.live_views())
    keys = [k async for k in r.scan_iter(f"{prefix}*", count=10000)]
    for i in range(0, len(keys), 10000):
        await r.delete(*keys[i : i + 10000])
    await r.aclose()
    return {
        "devices": devices, "eligible": eligible, "load_s": round(load_s, 2), "passes": passes,
        "issue_100_p50_ms": round(_pct(issuing, 50), 1),
        "issue_100_p99_ms": round(_pct(issuing, 99), 1),
        "scan_only_p50_ms": round(_pct(scanning, 50), 1),
        "scan_only_p99_ms": round(_pct(scanning, 99), 1),
    }  # fmt: skip


async def bench_uploads(info: Any, tmp: Path, n: int) -> dict[str, Any]:
    from schemas import codec
    from schemas.messages import CodecConfig, Update, UpdateChunk

    prefix = f"bup{time.time_ns() % 10**8}."
    s = CoordinatorSettings(
        kafka_bootstrap=info.kafka_bootstrap, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
        redis_url=info.redis_url, topic_prefix=prefix, model_store_dir=tmp / "um",
        signing_key_path=tmp / "k", task_key_path=tmp / "tk", pace_enabled=False, http_port=0,
        telemetry_ttl_s=3600.0, lease_s=3600.0,
    )  # fmt: skip
    levels = (1, 32)
    out: dict[str, Any] = {"uploads_per_level": n, "shards": 2}
    # only the parts the upload path uses: no loops, no broker; Kafka "acks" at once
    redis: Any = Redis.from_url(s.redis_url, decode_responses=True)
    link = MemoryFleetLink()
    metrics = CoordinatorMetrics(registry=_registry())
    key = load_task_key(s.task_key_path)
    coord = build_core(s, redis, metrics=metrics, producer=_NullProducer(), task_key=key,
                       task_sink=DirectTaskSink(link.publish, metrics, key), publish=link.publish)
    try:
        warm = max(levels)
        total = n * len(levels) + warm
        job = build_job({
            "model_name": "bup", "shards": 2, "concurrency": total,
            "spec": {"family": "softmax", "n_features": 64, "n_classes": 10},
        })  # fmt: skip
        await coord.jobs.put(job)
        coord.registry.create_initial(job.spec)
        now = time.time()
        tel = [Telemetry(device_id=f"u{i}", ts=now, battery=90.0, charging=True,
                         network="wifi", metered=False) for i in range(total)]  # fmt: skip
        for i in range(0, total, 5000):
            await coord.fleet.write_telemetry(tel[i : i + 5000], now)
        tasks = (await coord.selector.select_once(now))[job.spec.job_id]
        assert len(tasks) == total, len(tasks)
        b = list(job.spec.shard_bounds)
        rng = np.random.default_rng(0)
        frames = [
            codec.encode((rng.normal(size=b[k + 1] - b[k]) * 0.01).astype(np.float32),
                         CodecConfig(quant="none"))
            for k in range(2)
        ]  # fmt: skip

        def update(t: Any) -> Update:
            chunks = [UpdateChunk(shard=k, start=b[k], stop=b[k + 1], base_version=0,
                                  payload=frames[k]) for k in range(2)]  # fmt: skip
            return Update(update_id=f"u-{t.task_id}", task_id=t.task_id, job_id=t.job_id,
                          device_id=t.device_id, upload_token=t.upload_token, num_samples=10,
                          chunks=chunks, sent_ts=time.time())  # fmt: skip

        ups = [update(t) for t in tasks]
        # warm-up: job spec cached, Lua scripts loaded, a pool of connections open
        assert await coord.uploads.handle(ups[0], ups[0].device_id) == "accepted"
        got = await asyncio.gather(*(coord.uploads.handle(u, u.device_id) for u in ups[1:warm]))
        assert set(got) == {"accepted"}
        rest = ups[warm:]
        for li, conc in enumerate(levels):
            part = rest[li * n : (li + 1) * n]
            sem = asyncio.Semaphore(conc)
            results: list[str] = []

            async def one(
                u: Update, sem: asyncio.Semaphore = sem, res: list[str] = results
            ) -> None:
                async with sem:
                    res.append(await coord.uploads.handle(u, u.device_id))

            with _RoundTrips() as rt:
                t = time.perf_counter()
                await asyncio.gather(*(one(u) for u in part))
                dt = time.perf_counter() - t
            ok = results.count("accepted")
            out[f"c{conc}_accepted"] = ok
            out[f"c{conc}_uploads_per_s"] = round(ok / dt)
            out[f"c{conc}_round_trips_per_upload"] = round(rt.n / max(ok, 1), 2)
    finally:
        await redis.aclose()
    return out


async def bench_pulls(info: Any, tmp: Path, requests: int, conc: int) -> dict[str, Any]:
    prefix = f"bpull{time.time_ns() % 10**8}."
    s = CoordinatorSettings(
        kafka_bootstrap=info.kafka_bootstrap, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
        redis_url=info.redis_url, topic_prefix=prefix, model_store_dir=tmp / "pm",
        signing_key_path=tmp / "k", task_key_path=tmp / "tk", admin_token="b", http_port=0,
    )  # fmt: skip
    out: dict[str, Any] = {"requests": requests, "concurrency": conc}
    async with Coordinator(
        s, metrics=CoordinatorMetrics(registry=_registry()), link=MemoryFleetLink(),
        task_sink=DirectTaskSink,
    ) as coord:
        coord.app_state.publish_job = _noop_publish
        async with httpx.AsyncClient(
            base_url=coord.rest_url, timeout=30, limits=httpx.Limits(max_connections=conc)
        ) as http:
            body = {
                "model_name": "pull",
                "shards": 4,
                "spec": {"family": "mlp", "n_features": 784, "n_classes": 10, "hidden": 128},
            }
            r = await http.post("/v1/jobs", json=body, headers={"Authorization": "Bearer b"})
            r.raise_for_status()
            w = await http.get("/v1/models/pull/versions/0/weights")
            etag = w.headers["etag"]
            out["model_bytes"] = len(w.content)
            for label, headers, want in (
                ("full", {}, 200),
                ("not_modified", {"If-None-Match": etag}, 304),
            ):
                done = 0

                async def worker(h: dict[str, str] = headers, code: int = want) -> None:
                    nonlocal done
                    while done < requests:
                        done += 1
                        resp = await http.get("/v1/models/pull/versions/0/weights", headers=h)
                        assert resp.status_code == code

                t = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(conc)))
                out[f"{label}_pulls_per_s"] = round(done / (time.perf_counter() - t))
            out["onnx_first_ms"] = _ms(await _timed(http.get("/v1/models/pull/latest.onnx")))
    return out


async def _noop_publish(_spec: Any) -> None:
    return None


async def _timed(aw: Any) -> float:
    t = time.perf_counter()
    await aw
    return time.perf_counter() - t


def _ms(s: float) -> float:
    return round(s * 1000.0, 1)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from stack import LocalStack, StackSettings

    quick = args.quick
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        async with LocalStack(StackSettings.from_env()) as info:
            res["stack"] = info.describe()
            only = set(args.only or ["ingest", "selection", "pulls", "uploads"])
            if "ingest" in only:
                res["telemetry_ingest"] = await bench_ingest(
                    info, tmp, 5_000 if quick else 50_000, 500 if quick else 5_000
                )
            if "selection" in only:
                res["selection"] = await bench_selection(
                    info.redis_url, 10_000 if quick else 100_000, 5 if quick else 20
                )
            if "uploads" in only:
                res["upload_ingest"] = await bench_uploads(info, tmp, 200 if quick else 2_000)
            if "pulls" in only:
                res["model_pulls"] = await bench_pulls(info, tmp, 500 if quick else 3_000, 8)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", action="append", choices=["ingest", "selection", "pulls", "uploads"])
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
