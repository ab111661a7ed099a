"""The coordinator on the real stack (Kafka, Mosquitto, Redis) with MQTT test devices."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import httpx
import numpy as np
import pytest
import zstandard
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from coordinator.ingest import TelemetryBatcher
from coordinator.jobs import Job, build_job
from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from schemas.messages import (
    DeviceStatus,
    JobSpec,
    Message,
    ShardUpdate,
    ShardVersion,
    Task,
    Telemetry,
    Update,
    UpdateChunk,
    UploadAck,
    decode,
    encode,
)
from tests.test_coordinator_support import (  # noqa: F401
    FakeProducer,
    frame,
    make_selector,
    make_state,
    redis_url,
)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer adm"}
T = TypeVar("T")


async def eventually(fn: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    """Poll a condition (no fixed sleeps in assertions); fail after a generous timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


class Device:
    """A scripted MQTT device: records what the coordinator sends it."""

    def __init__(self, dev_id: str, host: str, port: int) -> None:
        self.id = dev_id
        self.client = aiomqtt.Client(host, port, identifier=f"test-{dev_id}-{time.time_ns()}")
        self.inbox: dict[str, list[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Device:
        await self.client.__aenter__()
        await self.client.subscribe(f"fleet/{self.id}/+", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._reader is not None
        self._reader.cancel()
        try:
            await self.client.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass

    async def _read(self) -> None:
        async for msg in self.client.messages:
            kind = str(msg.topic).rsplit("/", 1)[1]
            assert isinstance(msg.payload, bytes)
            self.inbox.setdefault(kind, []).append(msg.payload)

    async def send(self, kind: str, msg: Message, qos: int = 1) -> None:
        await self.client.publish(f"fleet/{self.id}/{kind}", encode(msg), qos=qos)

    async def hello(self) -> None:
        await self.send("status", DeviceStatus(device_id=self.id, state="online", ts=time.time()))
        await self.send(
            "telemetry",
            Telemetry(
                device_id=self.id,
                ts=time.time(),
                battery=80.0,
                charging=True,
                network="wifi",
                metered=False,
            ),
            0,
        )

    def got(self, kind: str, typ: type[Any]) -> list[Any]:
        return [decode(p, typ) for p in self.inbox.get(kind, [])]


def coordinator_settings(
    stack: Any, prefix: str, tmp_path: Path, *, lease_s: float
) -> CoordinatorSettings:
    """A coordinator on the test stack, isolated by ``prefix`` (topics, Redis keys, MQTT
    share group), admin token "adm", a fast selector and 2 shards at most."""
    return CoordinatorSettings(
        kafka_bootstrap=stack.kafka_bootstrap, mqtt_host=stack.mqtt_host,
        mqtt_port=stack.mqtt_port, redis_url=stack.redis_url, topic_prefix=prefix,
        redis_prefix=prefix, mqtt_share_group=prefix.strip("."),
        model_store_dir=tmp_path / "models", signing_key_path=tmp_path / "key",
        task_key_path=tmp_path / "task.key",
        admin_token="adm", selection_tick_s=0.2, lease_s=lease_s, max_shards=2, http_port=0,
    )  # fmt: skip


@pytest.fixture
async def coord(stack: Any, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Coordinator]:
    settings = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=3.0)
    async with Coordinator(settings) as c:
        await c.start()  # idempotent
        yield c
    await c.stop()  # idempotent


async def test_reissue_token_ack_and_rollback(coord: Coordinator, stack: Any) -> None:
    s = coord.settings
    async with (
        Device("dA", stack.mqtt_host, stack.mqtt_port) as a,
        Device("dB", stack.mqtt_host, stack.mqtt_port) as b,
        httpx.AsyncClient(base_url=coord.rest_url, timeout=10) as http,
    ):
        await a.hello()
        await eventually(lambda: coord.fleet.get("dA"))
        job = {
            "model_name": f"{s.topic_prefix}m",
            "shards": 2,
            "concurrency": 1,
            "spec": {"family": "softmax", "n_features": 4, "n_classes": 3},
        }
        r = await http.post("/v1/jobs", json=job, headers=AUTH)
        assert r.status_code == 201, r.text
        jid, bounds = r.json()["job_id"], r.json()["shard_bounds"]
        name = f"{s.topic_prefix}m"

        # A gets the task through fl.tasks -> dispatcher -> MQTT, then vanishes (LWT)
        (t1,) = await eventually(lambda: _async(a.got("task", Task)))
        await b.hello()
        await eventually(lambda: coord.fleet.get("dB"))
        await a.send("status", DeviceStatus(device_id="dA", state="offline", ts=time.time()))
        # after the lease the task is re-issued to B
        (t2,) = await eventually(lambda: _async(b.got("task", Task)))
        assert t2.task_id != t1.task_id and t2.job_id == jid
        assert (await coord.tasks.get(t1.task_id)).state == "expired"  # type: ignore[union-attr]

        chunks = [
            UpdateChunk(
                shard=i,
                start=bounds[i],
                stop=bounds[i + 1],
                base_version=0,
                payload=frame(bounds[i + 1] - bounds[i], i),
            )
            for i in range(2)
        ]
        upd = Update(
            update_id="u1",
            task_id=t2.task_id,
            job_id=jid,
            device_id="dB",
            upload_token="not-the-token",
            num_samples=5,
            chunks=chunks,
            sent_ts=time.time(),
        )
        await b.send("update", upd)
        (ack,) = await eventually(lambda: _async(b.got("ack", UploadAck)))
        assert ack.status == "rejected" and ack.reason == "bad_token"
        good = Update(
            **{
                **{f: getattr(upd, f) for f in upd.__struct_fields__},
                "upload_token": t2.upload_token,
            }
        )
        await b.send("update", good)
        acks = await eventually(lambda: _async(b.got("ack", UploadAck)[1:] or None))
        assert acks[0].status == "accepted"
        got = await _read_topic(stack.kafka_bootstrap, s.updates_topic, 2)
        assert sorted((decode(v, ShardUpdate).shard, p) for v, p in got) == [(0, 0), (1, 1)]

        # registry: a shard version arrives on fl.models -> version 1; rollback pins 0
        o0 = await http.get(f"/v1/models/{name}/latest.onnx")
        prod = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        await prod.start()
        try:
            raw = np.full(bounds[1], 0.5, "<f4").tobytes()
            sv = ShardVersion(
                job_id=jid,
                model_name=name,
                shard=0,
                start=0,
                stop=bounds[1],
                version=1,
                params=zstandard.ZstdCompressor().compress(raw),
                updates_applied=1,
                ts=time.time(),
            )
            await prod.send_and_wait(s.models_topic, encode(sv), key=f"{jid}:0".encode())
        finally:
            await prod.stop()

        async def v1() -> bool:
            return bool((await http.get(f"/v1/models/{name}/latest")).json()["version"] == 1)

        await eventually(v1)
        o1 = await http.get(f"/v1/models/{name}/latest.onnx")
        assert o1.headers["etag"] != o0.headers["etag"]
        r = await http.post(f"/v1/models/{name}/rollback", json={"version": 0}, headers=AUTH)
        assert r.status_code == 200
        o2 = await http.get(f"/v1/models/{name}/latest.onnx")
        assert o2.content == o0.content and o2.headers["etag"] == o0.headers["etag"]
        stats = (await http.get(f"/v1/jobs/{jid}")).json()
        # only shard 0 reported: applied on every shard counts it once shard 1 has it too
        assert stats["updates_accepted"] == 1 and stats["updates_applied"] == 0
        assert [sh["updates_applied"] for sh in stats["shards"]] == [1, 0]
        assert stats["updates_rejected_by_shards"] == 0
        assert (await http.get("/readyz")).status_code == 200


async def _async(v: T) -> T:
    return v


async def _read_topic(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, int]]:
    c = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await c.start()
    out: list[tuple[bytes, int]] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < n and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=500)
            for recs in batch.values():
                out += [(r.value, r.partition) for r in recs if r.value is not None]
    finally:
        await c.stop()
    return out


async def test_restart_keeps_jobs_and_registry_state(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    settings = CoordinatorSettings(
        kafka_bootstrap=stack.kafka_bootstrap, mqtt_host=stack.mqtt_host,
        mqtt_port=stack.mqtt_port, redis_url=stack.redis_url, topic_prefix=unique_prefix,
        model_store_dir=tmp_path / "models", signing_key_path=tmp_path / "key",
        task_key_path=tmp_path / "task.key",
        admin_token="adm", max_shards=2, http_port=0,
    )  # fmt: skip
    name = f"{unique_prefix}r"
    job = {"model_name": name, "shards": 2, "concurrency": 1,
           "spec": {"family": "softmax", "n_features": 3, "n_classes": 2}}  # fmt: skip

    def event(jid: str, bounds: list[int], shard: int, version: int) -> bytes:
        raw = np.full(bounds[shard + 1] - bounds[shard], float(version), "<f4").tobytes()
        return encode(ShardVersion(
            job_id=jid, model_name=name, shard=shard, start=bounds[shard],
            stop=bounds[shard + 1], version=version, updates_applied=version, ts=time.time(),
            params=zstandard.ZstdCompressor().compress(raw)))  # fmt: skip

    async def send(value: bytes) -> None:
        prod = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        await prod.start()
        try:
            await prod.send_and_wait(settings.models_topic, value)
        finally:
            await prod.stop()

    async with Coordinator(settings) as c1, httpx.AsyncClient(base_url=c1.rest_url) as http:
        body = (await http.post("/v1/jobs", json=job, headers=AUTH)).json()
        jid, bounds = body["job_id"], body["shard_bounds"]
        key1 = (await http.get("/v1/keys/model-signing")).json()
        await send(event(jid, bounds, 0, 1))
        await eventually(lambda: _async(c1.registry.newest_version(name) == 1 or None))

    async with Coordinator(settings) as c2, httpx.AsyncClient(base_url=c2.rest_url) as http:
        assert (await http.get("/v1/keys/model-signing")).json() == key1
        got = (await http.get(f"/v1/jobs/{jid}")).json()
        assert got["current_version"] == 1 and got["updates_applied"] == 0  # shard 1: none
        assert got["shards"][0]["updates_applied"] == 1 and got["shards"][0]["version"] == 1
        await send(event(jid, bounds, 1, 3))

        async def v2() -> dict[str, Any] | None:
            m = (await http.get(f"/v1/models/{name}/latest")).json()
            return m if m["version"] == 2 else None

        m = await eventually(v2)
        assert m["shard_versions"] == [1, 3]  # slice of shard 0 recovered from disk
        w = np.frombuffer((await http.get(f"/v1/models/{name}/versions/2/weights")).content, "<f4")
        assert np.all(w[: bounds[1]] == 1.0) and np.all(w[bounds[1] :] == 3.0)


async def test_two_coordinators_share_the_fleet(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from coordinator.metrics import CoordinatorMetrics, counter_value

    settings = CoordinatorSettings(
        kafka_bootstrap=stack.kafka_bootstrap, mqtt_host=stack.mqtt_host,
        mqtt_port=stack.mqtt_port, redis_url=stack.redis_url, topic_prefix=unique_prefix,
        model_store_dir=tmp_path / "models", signing_key_path=tmp_path / "key",
        task_key_path=tmp_path / "task.key",
        admin_token="adm", max_shards=2, selection_tick_s=0.2, http_port=0,
    )  # fmt: skip
    m1 = CoordinatorMetrics(registry=CollectorRegistry())
    m2 = CoordinatorMetrics(registry=CollectorRegistry())
    devs = [f"{unique_prefix.strip('.')}-d{i}" for i in range(6)]
    async with (
        Coordinator(settings, metrics=m1) as c1,
        Coordinator(settings, metrics=m2) as c2,
        httpx.AsyncClient(timeout=10) as http,
    ):
        for d in devs:
            async with Device(d, stack.mqtt_host, stack.mqtt_port) as dev:
                await dev.send("telemetry", Telemetry(
                    device_id=d, ts=time.time(), battery=50.0, charging=True,
                    network="wifi", metered=False), 1)  # fmt: skip

        async def all_seen() -> bool:
            return len(await c1.fleet.live_ids()) == len(devs)

        await eventually(all_seen)
        n1 = counter_value(m1.messages, kind="telemetry")
        n2 = counter_value(m2.messages, kind="telemetry")
        assert n1 + n2 == len(devs) and n1 > 0 and n2 > 0  # split, not duplicated
        body = {"model_name": f"{unique_prefix}two", "concurrency": 3,
                "spec": {"family": "softmax", "n_features": 2, "n_classes": 2}}  # fmt: skip
        r = await http.post(f"{c1.rest_url}/v1/jobs", json=body, headers=AUTH)
        jid = r.json()["job_id"]
        got = (await http.get(f"{c2.rest_url}/v1/jobs/{jid}")).json()
        assert got["job_id"] == jid
        fleet = (await http.get(f"{c2.rest_url}/v1/fleet")).json()
        assert fleet["total"] == len(devs)

        async def filled() -> bool:
            return await c1.tasks.active_count(jid) == 3

        await eventually(filled)
        # both selectors keep running; the lock keeps the job at its concurrency
        for _ in range(3):
            await c1.selector.locked_pass()
            await c2.selector.locked_pass()
        assert (await c2.stats.stats(jid))["tasks_issued"] == 3


def _shard_version(spec: JobSpec, shard: int, version: int) -> ShardVersion:
    b = spec.shard_bounds
    raw = np.zeros(b[shard + 1] - b[shard], dtype="<f4").tobytes()
    return ShardVersion(
        job_id=spec.job_id, model_name=spec.model_name, shard=shard, start=b[shard],
        stop=b[shard + 1], version=version, updates_applied=version, ts=time.time(),
        params=zstandard.ZstdCompressor().compress(raw))  # fmt: skip


async def test_sync_round_opens_only_after_the_model_moved(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Redis only: a closed FedAvg round holds the next one until every shard of the
    newest published model advanced (the real registry's ``newest_shard_versions``), and
    a round that never moves the model is given up after the grace period."""
    r: Any = redis_client(redis_url)
    state, _ = await make_state(r, tmp_path, f"g{time.time_ns()}:")
    keys = Keys(state.settings.key_prefix)

    async def latest(job: Job) -> list[int] | None:  # as Coordinator.shard_versions reads it
        return state.registry.newest_shard_versions(job.spec)

    sel = make_selector(state, r, producer=FakeProducer(), latest_versions=latest)
    batcher = TelemetryBatcher(state.fleet, state.metrics, batch=100, interval_s=0.01)

    async def heartbeat(ts: float) -> None:  # keep the 8 devices online at the test's clock
        for i in range(8):
            batcher.add(Telemetry(device_id=f"d{i}", ts=ts, battery=90.0, charging=False,
                                  network="wifi", metered=False))  # fmt: skip
        await batcher.flush()
        # the store stamps arrival time; move "last seen" to the test's (future) clock
        await r.zadd(keys.seen, {f"d{i}": ts for i in range(8)})

    job = build_job({
        "model_name": "m", "shards": 2, "concurrency": 2,
        "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
        "strategy": {"name": "fedavg", "buffer_size": 2},
        "selection": {"mode": "sync", "over_selection": 1.5, "round_deadline_s": 50.0,
                      "round_grace_s": 20.0},
    })  # fmt: skip
    jid, spec = job.spec.job_id, job.spec
    await state.jobs.put(job)
    state.registry.create_initial(spec)
    now = time.time()
    await heartbeat(now)
    key = keys.round(jid)

    async def admitted(n: int) -> None:  # as n uploads' claim_in_round would count them
        await r.hincrby(key, "taken", n)

    try:
        r1 = (await sel.select_once(now))[jid]
        assert len(r1) == 3  # K = buffer_size 2, x 1.5 invited
        h = await r.hgetall(key)
        assert h["versions0"] == "0,0" and h["target"] == "2" and h["taken"] == "0"
        await admitted(2)  # round 1 closes on count
        assert (await sel.select_once(now))[jid] == []  # aggregators not flushed yet
        assert (await r.hgetall(key))["closed"]
        state.registry.apply(spec, _shard_version(spec, 0, 1))
        assert (await sel.select_once(now + 1))[jid] == []  # half-updated model
        state.registry.apply(spec, _shard_version(spec, 1, 1))
        r2 = (await sel.select_once(now + 2))[jid]  # every shard moved: round 2
        assert len(r2) == 3
        h = await r.hgetall(key)
        assert h["round"] == "2" and h["versions0"] == "1,1"
        # round 2 closes on count but its updates are lost: open after deadline + grace
        await admitted(2)
        assert (await sel.select_once(now + 40))[jid] == []
        assert (await sel.select_once(now + 2 + 50 + 19))[jid] == []
        await heartbeat(now + 2 + 50 + 20)
        r3 = (await sel.select_once(now + 2 + 50 + 20))[jid]
        assert len(r3) == 3
        stats = await state.stats.stats(jid)
        assert stats["rounds_opened_advanced"] == 1 and stats["rounds_opened_grace"] == 1
        # round 3 closes at its deadline with 1 of 2 updates: the aggregator will not flush
        # on its own, so round 4 opens at once and only needs the missing update
        await admitted(1)
        await heartbeat(now + 2 + 70 + 50)
        r4 = (await sel.select_once(now + 2 + 70 + 50))[jid]
        assert len(r4) == 2  # over_select(1, 1.5)
        h = await r.hgetall(key)
        assert h["carry"] == "1" and h["target"] == "1"
    finally:
        await r.aclose()
