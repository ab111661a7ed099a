"""Defences that hold even against enrolled devices (issue 16, item 4).

- telemetry and status values are bounded to the physically plausible (schema, ``range``),
  and telemetry whose ``ts`` is far from the coordinator's clock is refused (``clock_skew``);
- devices not heard from for ``device_ttl_s`` leave the fleet and every index of it
  (``FleetStore.sweep``), but not while a task, a cooldown or today's task count needs them;
- per-device rate limits on telemetry and uploads (``coordinator.ratelimit``).

Unit tests of the bounds, the sweep on a private Redis, and the refusals with their
``/metrics`` counters on the real stack (Kafka, Mosquitto, Redis).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coordinator.fleet import FleetStore
from coordinator.ingest import clock_ok
from coordinator.keys import Keys
from coordinator.metrics import CoordinatorMetrics
from coordinator.redis_client import redis_client
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.tasks import TaskStore
from schemas import messages as m
from schemas.errors import SchemaError, SettingsError
from schemas.messages import (
    DeviceStatus,
    Telemetry,
    Update,
    UpdateChunk,
    UploadAck,
    decode,
    encode,
)
from tests.test_coordinator_integration import Device, coordinator_settings, eventually
from tests.test_coordinator_support import redis_url

__all__ = ["redis_url"]  # fixture

NOW = 1_800_000_000.0


def raw_telemetry(dev: str, **kw: Any) -> bytes:
    """Telemetry as a device could encode it, bypassing the constructor's checks."""
    body: dict[str, Any] = {"kind": "telemetry", "v": 1, "device_id": dev, "ts": time.time(),
                            "battery": 80.0, "charging": True, "network": "wifi",
                            "metered": False}  # fmt: skip
    body.update(kw)
    return msgspec.msgpack.encode(body)


def refused(data: bytes, kind: type[m.Message] = Telemetry) -> str:
    with pytest.raises(SchemaError) as err:
        decode(data, kind)
    return err.value.reason


# ------------------------------------------------------------------------- bounds (unit)


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("bandwidth_kbps", m.MAX_BANDWIDTH_KBPS, 1e308),
        ("rtt_ms", m.MAX_RTT_MS, m.MAX_RTT_MS + 0.5),
        ("ts", m.MAX_DEVICE_TS, 9.9e11),  # the year 31,700
        ("battery", 100.0, 100.0001),
        ("agent_version", "v" * m.MAX_AGENT_VERSION, "v" * 900_000),
        ("agent_version", "1.2.3-rc.1+build.7 (x86_64)", "1.2\n"),
        ("agent_version", "", "versión"),
    ],
)
def test_telemetry_values_are_bounded(field: str, ok: Any, bad: Any) -> None:
    assert getattr(decode(raw_telemetry("d", **{field: ok}), Telemetry), field) == ok
    assert refused(raw_telemetry("d", **{field: bad})) == "range"


@pytest.mark.parametrize("field", ["bandwidth_kbps", "rtt_ms", "ts"])
def test_infinite_telemetry_stays_non_finite(field: str) -> None:
    assert refused(raw_telemetry("d", **{field: float("inf")})) == "non_finite"
    assert refused(raw_telemetry("d", **{field: float("nan")})) in {"range", "non_finite"}


@given(bw=st.floats(0.0, m.MAX_BANDWIDTH_KBPS), rtt=st.floats(0.0, m.MAX_RTT_MS),
       ver=st.text(st.characters(min_codepoint=32, max_codepoint=126),
                   max_size=m.MAX_AGENT_VERSION))  # fmt: skip
def test_every_plausible_reading_decodes(bw: float, rtt: float, ver: str) -> None:
    t = decode(raw_telemetry("d", bandwidth_kbps=bw, rtt_ms=rtt, agent_version=ver), Telemetry)
    assert (t.bandwidth_kbps, t.rtt_ms, t.agent_version) == (bw, rtt, ver)


@given(bw=st.floats(m.MAX_BANDWIDTH_KBPS, 1e308, exclude_min=True))
def test_every_absurd_bandwidth_is_refused(bw: float) -> None:
    assert refused(raw_telemetry("d", bandwidth_kbps=bw)) == "range"


def test_status_reason_and_ts_are_bounded() -> None:
    def status(**kw: Any) -> bytes:
        return msgspec.msgpack.encode({"kind": "status", "v": 1, "device_id": "d",
                                       "state": "offline", "ts": NOW, **kw})  # fmt: skip

    assert decode(status(reason="r" * m.MAX_STATUS_REASON), DeviceStatus).state == "offline"
    assert decode(status(ts=1.0), DeviceStatus).ts == 1.0  # an LWT may be old: no skew here
    assert refused(status(reason="r" * (m.MAX_STATUS_REASON + 1)), DeviceStatus) == "range"
    assert refused(status(ts=9.9e11), DeviceStatus) == "range"


def test_the_clock_window_is_inclusive() -> None:
    assert clock_ok(NOW + 300, NOW, 300, 86400) and clock_ok(NOW - 86400, NOW, 300, 86400)
    assert not clock_ok(NOW + 300.001, NOW, 300, 86400)
    assert not clock_ok(NOW - 86400.001, NOW, 300, 86400)


def test_settings_of_the_defences() -> None:
    s = CoordinatorSettings()
    assert (s.device_ttl_s, s.telemetry_max_ahead_s, s.telemetry_max_behind_s) == (
        86400.0, 300.0, 86400.0)  # fmt: skip
    for bad in ({"device_ttl_s": 60.0}, {"device_ttl_s": 0.0}, {"telemetry_rate_per_s": -1.0},
                {"upload_burst": 0}, {"device_sweep_s": 0.0},
                {"telemetry_max_ahead_s": float("nan")}):  # fmt: skip
        with pytest.raises(SettingsError):
            CoordinatorSettings(**bad)
    assert CoordinatorSettings(telemetry_rate_per_s=0.0).telemetry_rate_per_s == 0.0  # off


# ------------------------------------------------------------------ the sweep (private Redis)


Store = tuple[FleetStore, TaskStore, Any, Keys]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    r: Any = redis_client(redis_url)
    prefix = f"sw{uuid.uuid4().hex[:8]}:"
    yield (FleetStore(r, prefix, 60.0, device_ttl_s=100.0), TaskStore(r, prefix), r,
           Keys(prefix))  # fmt: skip
    await r.aclose()


def tel(dev: str, ts: float) -> Telemetry:
    return Telemetry(device_id=dev, ts=ts, battery=90.0, charging=False, network="wifi",
                     metered=False)  # fmt: skip


async def traces(r: Any, k: Keys, dev: str) -> list[str]:
    """Where ``dev`` is still recorded."""
    out = [name for name in (k.device(dev), k.history(dev)) if await r.exists(name)]
    out += [name for name in (k.selt, k.sels) if await r.hexists(name, dev)]
    out += [z for z in (k.seen, k.lastseen, k.contrib) if await r.zscore(z, dev) is not None]
    return out


async def test_a_silent_device_leaves_every_index(store: Store) -> None:
    fleet, _, r, k = store
    await fleet.write_telemetry([tel("gone", NOW), tel("here", NOW)], now=NOW)
    await fleet.release_task("gone", "t0", contributed=True, outcome="uploaded")  # hist, contrib
    assert len(await traces(r, k, "gone")) == 7
    await fleet.write_telemetry([tel("here", NOW + 90)], now=NOW + 90)
    assert await fleet.sweep(now=NOW + 99) == 0  # not yet
    assert await fleet.sweep(now=NOW + 101) == 1
    assert await traces(r, k, "gone") == []
    assert await fleet.all_ids() == ["here"] and await fleet.get("gone") is None
    assert await fleet.sweep(now=NOW + 101) == 0  # a second sweep (another coordinator): no-op


async def test_the_sweep_keeps_a_device_while_its_task_cooldown_or_daily_count_needs_it(
    store: Store,
) -> None:
    fleet, tasks, r, k = store
    t0 = (NOW // 86400) * 86400 + 1000  # early in a UTC day
    await fleet.write_telemetry([tel(d, t0) for d in ("busy", "cool", "capped")], now=t0)
    await fleet.write_telemetry([tel("idle", t0 + 5)], now=t0 + 5)  # behind the kept ones
    await tasks.create(task_id="tb", job_id="j", device_id="busy", token="x", issued_ts=t0,
                       deadline_ts=t0 + 500)  # fmt: skip
    await fleet.assign_task("busy", "tb", t0, counts=False)
    await fleet.release_task("cool", "", contributed=False, cooldown_until=t0 + 1000)
    await fleet.assign_task("capped", "tc", t0)  # counts toward today's daily_cap
    await fleet.release_task("capped", "tc", contributed=True)
    # batch=1: the three kept devices in front are stepped over, the one behind goes
    assert await fleet.sweep(now=t0 + 200, batch=1) == 1
    assert await fleet.all_ids() == ["busy", "capped", "cool"]
    rec = await tasks.get("tb")
    assert rec is not None
    await tasks.transition(rec, "expired", ("offered", "accepted"))  # the lease decided
    await fleet.release_task("busy", "tb", contributed=False)
    assert await fleet.sweep(now=t0 + 200) == 1
    assert await fleet.sweep(now=t0 + 1001) == 1  # cooldown over
    assert await fleet.all_ids() == ["capped"]
    assert await fleet.sweep(now=t0 + 86400) == 1  # a new day
    assert await fleet.all_ids() == [] and await traces(r, k, "capped") == []


async def test_an_offline_status_never_creates_a_device(store: Store) -> None:
    """Retained LWTs are replayed to every coordinator that subscribes: a swept device
    must not come back from its own last will."""
    fleet, _, r, k = store
    await fleet.write_status(DeviceStatus(device_id="ghost", state="offline", ts=1.0), now=NOW)
    assert await traces(r, k, "ghost") == []
    await fleet.write_telemetry([tel("d", NOW)], now=NOW)
    await fleet.write_status(DeviceStatus(device_id="d", state="offline", ts=NOW), now=NOW)
    assert (await fleet.get("d"))["state"] == "offline"  # type: ignore[index]


# ------------------------------------------------------------------ the real stack


@pytest.fixture(scope="module")
async def coord(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Coordinator]:
    """One coordinator for the module: 1 s liveness, 2 s device TTL swept every 0.2 s,
    telemetry 2/s (burst 5), uploads 1 per 100 s (burst 2)."""
    tmp: Path = tmp_path_factory.mktemp("defences")
    prefix = f"t{uuid.uuid4().hex[:8]}."
    s = coordinator_settings(stack, prefix, tmp, lease_s=30.0).replace(
        telemetry_ttl_s=1.0, device_ttl_s=2.0, device_sweep_s=0.2, telemetry_rate_per_s=2.0,
        telemetry_burst=5, upload_rate_per_s=0.01, upload_burst=2,
    )  # fmt: skip
    async with Coordinator(s, metrics=CoordinatorMetrics(registry=CollectorRegistry())) as c:
        yield c


async def metric(c: Coordinator, name: str, **labels: str) -> float:
    """A sample of ``GET /metrics`` (0 when absent)."""
    async with httpx.AsyncClient(base_url=c.rest_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def mqtt(stack: Any) -> aiomqtt.Client:
    return aiomqtt.Client(stack.mqtt_host, stack.mqtt_port, identifier=f"t-{uuid.uuid4().hex}")


REJECTED = "fedfleet_coord_rejected_total"


@pytest.mark.integration
async def test_absurd_telemetry_is_refused_counted_and_never_stored(
    coord: Coordinator, stack: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    absurd: dict[str, dict[str, Any]] = {
        f"bw-{tag}": {"bandwidth_kbps": 1e308},
        f"rtt-{tag}": {"rtt_ms": 1e9},
        f"year-{tag}": {"ts": 9.9e11},
        f"ver-{tag}": {"agent_version": "x" * 900_000},
    }
    skewed: dict[str, dict[str, Any]] = {f"ahead-{tag}": {"ts": time.time() + 3600},
              f"behind-{tag}": {"ts": time.time() - 2 * 86400}}  # fmt: skip
    rng0 = await metric(coord, REJECTED, source="telemetry", reason="range")
    skew0 = await metric(coord, REJECTED, source="telemetry", reason="clock_skew")
    ok = f"ok-{tag}"
    async with mqtt(stack) as cl:
        for dev, kw in {**absurd, **skewed}.items():
            await cl.publish(f"fleet/{dev}/telemetry", raw_telemetry(dev, **kw), qos=1)
        await cl.publish(f"fleet/{ok}/telemetry", raw_telemetry(ok), qos=1)  # after them

    async def counted() -> bool:
        return (await metric(coord, REJECTED, source="telemetry", reason="range") - rng0 == 4
                and await metric(coord, REJECTED, source="telemetry",
                                 reason="clock_skew") - skew0 == 2)  # fmt: skip

    await eventually(counted, 30)
    await eventually(lambda: coord.fleet.get(ok), 30)  # the good one is stored
    for dev in (*absurd, *skewed):
        assert await coord.fleet.get(dev) is None
    assert await metric(coord, "fedfleet_coord_loop_errors_total", loop="ingest") == 0


@pytest.mark.integration
async def test_ghost_devices_expire_from_the_fleet(coord: Coordinator, stack: Any) -> None:
    ghosts = [f"ghost-{uuid.uuid4().hex[:6]}-{i}" for i in range(50)]
    expired0 = await metric(coord, "fedfleet_coord_devices_expired_total")
    async with mqtt(stack) as cl:
        for g in ghosts:
            await cl.publish(f"fleet/{g}/telemetry", raw_telemetry(g), qos=1)

    async def listed() -> set[str]:
        async with httpx.AsyncClient(base_url=coord.rest_url, timeout=10) as http:
            r = await http.get("/v1/devices", params={"limit": 1000})
        return {d["device_id"] for d in r.json()["devices"]} & set(ghosts)

    await eventually(listed, 30)  # they arrived (some may already be gone again: 2 s TTL)

    async def gone() -> bool:
        return not await listed()

    await eventually(gone, 30)
    r: Any = coord.redis
    k = Keys(coord.settings.key_prefix)
    for g in ghosts:
        assert await traces(r, k, g) == []
    assert await metric(coord, "fedfleet_coord_devices_expired_total") - expired0 >= 50
    async with httpx.AsyncClient(base_url=coord.rest_url, timeout=10) as http:
        assert (await http.get(f"/v1/devices/{ghosts[0]}")).status_code == 404


@pytest.mark.integration
async def test_a_telemetry_flood_is_rate_limited_while_a_normal_device_keeps_being_seen(
    coord: Coordinator, stack: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    normal, flood = f"normal-{tag}", f"flood-{tag}"
    limited0 = await metric(coord, REJECTED, source="telemetry", reason="rate_limited")
    stop = asyncio.Event()
    sent: list[float] = []

    async def heartbeat(cl: aiomqtt.Client) -> None:  # 1.7/s: inside the 2/s limit
        while not stop.is_set():
            ts = time.time()
            await cl.publish(f"fleet/{normal}/telemetry", raw_telemetry(normal, ts=ts), qos=1)
            sent.append(ts)
            await asyncio.sleep(0.6)

    async with mqtt(stack) as cl, mqtt(stack) as attacker:
        beat = asyncio.create_task(heartbeat(cl))
        try:
            await eventually(lambda: coord.fleet.get(normal), 30)
            for _ in range(300):
                await attacker.publish(f"fleet/{flood}/telemetry", raw_telemetry(flood), qos=0)
            await attacker.publish(f"fleet/{flood}/telemetry", raw_telemetry(flood), qos=1)

            async def limited() -> bool:
                n = await metric(coord, REJECTED, source="telemetry", reason="rate_limited")
                return n - limited0 >= 250

            await eventually(limited, 30)
            mark = len(sent)

            async def fresh() -> bool:  # readings sent after the flood keep arriving
                d = await coord.fleet.get(normal)
                return d is not None and d.get("ts", 0.0) in sent[mark + 1 :]

            await eventually(fresh, 30)
        finally:
            stop.set()
            await beat
    total = await metric(coord, REJECTED, source="telemetry", reason="rate_limited") - limited0
    assert total <= 301 - 5  # the burst got through


def update(dev: str, i: int) -> Update:
    chunk = UpdateChunk(shard=0, start=0, stop=4, base_version=0, payload=b"\x00" * 8)
    return Update(update_id=f"u-{dev}-{i}", task_id=f"t-none-{i}", job_id="j", device_id=dev,
                  upload_token="x", num_samples=1, chunks=[chunk], sent_ts=time.time())  # fmt: skip


@pytest.mark.integration
async def test_uploads_over_the_limit_are_refused_with_rate_limited(
    coord: Coordinator, stack: Any
) -> None:
    dev = f"up-{uuid.uuid4().hex[:6]}"
    limited0 = await metric(coord, REJECTED, source="update", reason="rate_limited")
    async with Device(dev, stack.mqtt_host, stack.mqtt_port) as d:
        for i in range(5):
            await d.send("update", update(dev, i))

        async def answered() -> list[UploadAck] | None:
            got = d.got("ack", UploadAck)
            return got if len(got) == 5 else None

        acks = await eventually(answered, 30)
    # burst 2: two are decided (no such task), three refused before any Redis work
    assert sorted(a.reason for a in acks) == ["rate_limited"] * 3 + ["unknown_task"] * 2
    assert all(a.status == "rejected" for a in acks)
    async with httpx.AsyncClient(base_url=coord.rest_url, timeout=10) as http:
        r = await http.post("/v1/uploads", content=encode(update(dev, 9)),
                            headers={"Content-Type": "application/msgpack"})  # fmt: skip
    assert r.status_code == 200
    ack = decode(r.content, UploadAck)
    assert (ack.status, ack.reason) == ("rejected", "rate_limited")  # one bucket, both paths
    assert await metric(coord, REJECTED, source="update", reason="rate_limited") - limited0 == 4
