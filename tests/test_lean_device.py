"""Lean wire-level devices (``sim.lean``, ``sim.lean_codec``, ``sim.lean_fleet``).

* the MQTT 3.1.1 codec: byte layouts from the standard, a stream cut anywhere, malformed
  input refused; then against the real Mosquitto (CONNECT/CONNACK, SUBSCRIBE/SUBACK,
  PUBLISH/PUBACK both ways, PINGREQ/PINGRESP, the will on a dropped connection, a clean
  DISCONNECT that sends none);
* the decline rules (pure);
* a lean fleet on the real secure stack (TLS broker with per-device credentials from
  enrolment, the coordinator, Redis): the coordinator stores its telemetry and counts it
  online, the last will marks a cut device offline, a job's tasks reach the devices and
  are declined (the slot is freed), a device without a valid credential is refused;
* ``fedfleet loadtest scale --device-mode lean`` end to end (worker processes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from coordinator.keys import Keys
from edge_agent.probe import ProbeReading
from loadtest.cli import main
from loadtest.runner import Env, environment
from schemas.messages import DeviceStatus, Task, Telemetry, decode
from sim import lean_codec as mq
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.lean import DECLINE_REASON, LEAN_AGENT_VERSION, decline_reason
from sim.lean_fleet import LeanFleet
from stack import StackInfo, StackSettings
from stack.mqtt import Mosquitto, mosquitto_binary

GUARD_S = 20.0  # hang guard, never an expectation


async def until(cond: Callable[[], Any], what: str, timeout: float = GUARD_S) -> Any:
    """Poll ``cond`` (sync or async) until it is truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- codec (pure)


def test_connect_layout_follows_the_standard() -> None:
    pkt = mq.connect("c1", keepalive=60, clean_session=False, username="u", password="p",
                     will=("w/t", b"bye", 1, True))  # fmt: skip
    body = (b"\x00\x04MQTT\x04" + bytes((0x80 | 0x40 | 0x20 | 0x08 | 0x04,)) + b"\x00\x3c"
            + b"\x00\x02c1" + b"\x00\x03w/t" + b"\x00\x03bye" + b"\x00\x01u" + b"\x00\x01p")
    assert pkt == b"\x10" + bytes((len(body),)) + body
    bare = mq.connect("c", keepalive=30, clean_session=True)
    assert bare[9] == 0x02 and bare.endswith(b"\x00\x01c")  # clean session only


def test_publish_subscribe_and_small_packets() -> None:
    assert mq.publish(b"a/b", b"xy") == b"\x30\x07\x00\x03a/bxy"
    assert mq.publish(b"a", b"", 1, packet_id=258, retain=True, dup=True) == \
        b"\x3b\x05\x00\x01a\x01\x02"  # fmt: skip
    assert mq.subscribe(7, [("t/1", 1), ("t/2", 0)]) == \
        b"\x82\x0e\x00\x07\x00\x03t/1\x01\x00\x03t/2\x00"  # fmt: skip
    assert mq.puback(5) == b"\x40\x02\x00\x05"
    assert mq.PINGREQ_PACKET == b"\xc0\x00" and mq.DISCONNECT_PACKET == b"\xe0\x00"


@pytest.mark.parametrize("size", [0, 127, 128, 16_383, 16_384, 300_000])
def test_remaining_length_round_trips_at_varint_boundaries(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    pkt = mq.publish(b"t", payload, 1, packet_id=9)
    [(kind, flags, body)] = mq.PacketReader().feed(pkt)
    assert kind == mq.PUBLISH and flags == 0x02
    assert mq.decode_publish(flags, body) == ("t", 1, 9, False, payload)


def test_reader_reassembles_a_stream_cut_anywhere() -> None:
    stream = (mq.publish(b"fleet/d/task", b"x" * 200, 1, packet_id=3) + b"\x20\x02\x00\x00"
              + b"\xd0\x00" + b"\x90\x03\x00\x01\x01" + b"\x40\x02\x00\x03")  # fmt: skip
    for step in (1, 2, 3, 7, 64, len(stream)):
        r = mq.PacketReader()
        got: list[tuple[int, int, bytes]] = []
        for i in range(0, len(stream), step):
            got += r.feed(stream[i : i + step])
        assert [k for k, _, _ in got] == [mq.PUBLISH, mq.CONNACK, mq.PINGRESP, mq.SUBACK,
                                          mq.PUBACK]  # fmt: skip
        assert mq.decode_connack(got[1][2]) == (False, 0)
        assert mq.decode_suback(got[3][2]) == (1, b"\x01")
        assert mq.decode_packet_id(got[4][2]) == 3


def test_malformed_input_is_a_protocol_error() -> None:
    with pytest.raises(mq.MqttProtocolError):
        mq.PacketReader().feed(b"\x30\xff\xff\xff\xff\x01")  # 5-byte remaining length
    with pytest.raises(mq.MqttProtocolError):
        mq.PacketReader().feed(b"\x30\xff\xff\xff\x7f")  # past MAX_PACKET
    with pytest.raises(mq.MqttProtocolError):
        mq.decode_connack(b"\x00")
    with pytest.raises(mq.MqttProtocolError):
        mq.decode_publish(0x02, b"\x00\x05ab")  # topic longer than the body
    with pytest.raises(mq.MqttProtocolError):
        mq.decode_publish(0x00, b"\x00\x02\xff\xfe")  # not UTF-8
    with pytest.raises(mq.MqttProtocolError):
        mq.decode_suback(b"\x00\x01")


def test_decline_reasons_follow_the_agents_rules() -> None:
    now = time.time()
    task = Task(task_id="t1", job_id="j", device_id="d", model_name="m", upload_token="tok",
                issued_ts=now, deadline_ts=now + 60, min_battery=20.0)  # fmt: skip
    ok = ProbeReading(battery=80.0, charging=False, network="wifi")
    assert decline_reason(task, ok, now) == DECLINE_REASON
    assert decline_reason(task, ok, now + 61) == "expired"
    assert decline_reason(Task(**{**_fields(task), "upload_token": ""}), ok, now) == "no_token"
    low = ProbeReading(battery=5.0, charging=False, network="wifi")
    assert decline_reason(task, low, now) == "low_battery"
    assert decline_reason(task, ProbeReading(network="cellular", metered=True), now) == "metered"


def _fields(task: Task) -> dict[str, Any]:
    return {f: getattr(task, f) for f in task.__struct_fields__}


# --------------------------------------------------------------------------- codec vs Mosquitto


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path / "mqtt")
    broker.start()
    try:
        await asyncio.to_thread(broker.wait_ready)
        yield broker
    finally:
        broker.stop()


class Raw:
    """A raw MQTT session over asyncio streams, on the codec."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.reader = r, w, mq.PacketReader()
        self.queue: list[tuple[int, int, bytes]] = []

    @classmethod
    async def open(cls, broker: Mosquitto) -> Raw:
        return cls(*await asyncio.open_connection(broker.host, broker.port))

    def send(self, data: bytes) -> None:
        self.w.write(data)

    async def next(self) -> tuple[int, int, bytes]:
        while not self.queue:
            data = await asyncio.wait_for(self.r.read(65536), GUARD_S)
            assert data, "connection closed"
            self.queue += self.reader.feed(data)
        return self.queue.pop(0)


async def test_codec_speaks_mqtt_311_with_mosquitto(mosquitto: Mosquitto) -> None:
    will = ("fleet/raw-1/status", b"gone", 1, True)
    a = await Raw.open(mosquitto)
    a.send(mq.connect("raw-1", keepalive=30, clean_session=True, will=will))
    kind, _, body = await a.next()
    assert kind == mq.CONNACK and mq.decode_connack(body) == (False, 0)
    a.send(mq.subscribe(1, [("fleet/raw-1/#", 1)]))
    kind, _, body = await a.next()
    assert kind == mq.SUBACK and mq.decode_suback(body) == (1, b"\x01")
    big = b"p" * 20_000  # a 3-byte remaining length
    a.send(mq.publish(b"fleet/raw-1/task", big, 1, packet_id=2))
    got = [await a.next(), await a.next()]  # our PUBACK and the delivery, in either order
    acks = [p for p in got if p[0] == mq.PUBACK]
    pubs = [p for p in got if p[0] == mq.PUBLISH]
    assert mq.decode_packet_id(acks[0][2]) == 2
    topic, qos, pid, _, payload = mq.decode_publish(pubs[0][1], pubs[0][2])
    assert (topic, qos, payload) == ("fleet/raw-1/task", 1, big)
    a.send(mq.puback(pid) + mq.PINGREQ_PACKET)
    assert (await a.next())[0] == mq.PINGRESP

    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as watcher:
        await watcher.subscribe("fleet/+/status", qos=1)
        a.w.transport.abort()  # no DISCONNECT: the broker publishes the will
        msg = await asyncio.wait_for(anext(aiter(watcher.messages)), GUARD_S)
        assert (str(msg.topic), msg.payload) == ("fleet/raw-1/status", b"gone")
        b = await Raw.open(mosquitto)
        b.send(mq.connect("raw-2", keepalive=30, clean_session=True,
                          will=("fleet/raw-2/status", b"never", 1, False)))  # fmt: skip
        assert (await b.next())[0] == mq.CONNACK
        b.send(mq.DISCONNECT_PACKET)  # a clean goodbye: no will
        await b.w.drain()
        b.w.close()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(watcher.messages)), 1.0)


async def test_plain_lean_fleet_reports_and_comes_back_after_a_storm(mosquitto: Mosquitto) -> None:
    """The insecure mode: plain TCP, anonymous; telemetry decodes with the schemas, the
    will fires for every cut session, every device reconnects."""
    seen: dict[str, list[bytes]] = {}
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as watcher:
        await watcher.subscribe("fleet/#", qos=1)

        async def watch() -> None:
            async for m in watcher.messages:
                assert isinstance(m.payload, bytes)
                seen.setdefault(str(m.topic).rsplit("/", 1)[1], []).append(m.payload)

        reader = asyncio.create_task(watch())
        spec = FleetSpec(devices=50, telemetry_interval_s=0.5, connect_per_s=500.0,
                         keepalive_s=30, id_prefix="plain", reconnect_max_s=1.0)  # fmt: skip
        try:
            async with LeanFleet(spec, mqtt_host=mosquitto.host, mqtt_port=mosquitto.port) as f:
                await until(lambda: f.connected() == 50, "50 connected")
                await until(lambda: len(seen.get("telemetry", [])) >= 100, "telemetry")
                t = decode(seen["telemetry"][0], Telemetry)
                assert t.agent_version == LEAN_AGENT_VERSION and t.device_id.startswith("plain-")
                assert f.abort_network(1.0) == 50
                await until(lambda: f.stats()["connects"] >= 100, "50 reconnects")
                await until(lambda: sum(1 for p in seen["status"]
                                        if decode(p, DeviceStatus).reason == "lost") == 50,
                            "50 wills")  # fmt: skip
            await until(lambda: sum(1 for p in seen["status"]
                                    if decode(p, DeviceStatus).reason == "shutdown") == 50,
                        "50 farewells")  # fmt: skip
            status = [decode(p, DeviceStatus) for p in seen["status"]]
            assert sum(1 for s in status if s.state == "online") == 100
        finally:
            reader.cancel()


# --------------------------------------------------------------------------- secure stack


@pytest.fixture
async def secure_env(stack: StackInfo) -> AsyncIterator[Env]:
    """The session's Kafka; a TLS broker with per-device credentials, a Redis and a
    coordinator of its own (what ``fedfleet loadtest`` runs by default)."""
    async with environment(StackSettings.from_env(kafka_url=stack.kafka_bootstrap, secure=True),
                           aggregators=0) as env:  # fmt: skip
        yield env


@pytest.mark.integration
async def test_lean_devices_at_the_coordinator_in_the_secure_mode(secure_env: Env) -> None:
    env = secure_env
    assert env.info.mqtt_tls
    spec = FleetSpec(devices=6, telemetry_interval_s=0.5, connect_per_s=100.0, keepalive_s=30,
                     id_prefix=f"lean{env.run_id}", reconnect_max_s=2.0, charging_share=1.0)
    ids = spec.device_ids()
    enrolled = await enrol_if_secure(env.http, env.services, ids)
    assert enrolled.credentials is not None and enrolled.ca_file is not None
    keys = Keys(env.services.redis_prefix)
    redis = Redis.from_url(env.info.redis_url, decode_responses=True)
    fleet = LeanFleet(spec, mqtt_host=env.info.mqtt_host, mqtt_port=env.info.mqtt_port,
                      credentials=enrolled.credentials, ca_file=enrolled.ca_file)  # fmt: skip
    try:
        async with fleet:
            await until(lambda: fleet.connected() == 6, "6 devices connected over TLS")

            async def stored() -> bool:  # telemetry in Redis, as the coordinator wrote it
                rows = [await redis.hgetall(keys.device(d)) for d in ids]
                return all(r.get("state") == "online" and r.get("ts") and
                           r.get("agent_version") == LEAN_AGENT_VERSION for r in rows)  # fmt: skip

            await until(stored, "telemetry and online status of every device in Redis")
            r = await env.http.get(f"/v1/devices/{ids[0]}")
            assert r.status_code == 200 and r.json()["battery"] > 0, r.text
            assert (await env.http.get("/v1/fleet")).status_code == 200

            # the last will: the connection drops without DISCONNECT
            assert fleet.vanish(5)
            await until(lambda: _state(redis, keys, ids[5], "offline"), "the will marks it offline")

            # a job's tasks reach the devices; each declines, so the slot is freed at once
            job = f"lean-{env.run_id}"
            body = {"job_id": job, "model_name": job, "shards": 1, "concurrency": 3,
                    "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
                    "eligibility": {"min_battery": 0, "allow_metered": True}}  # fmt: skip
            await env.api.create_job(body)
            await until(lambda: fleet.stats()["tasks_declined"] >= 3, "3 tasks declined")

            async def counted() -> bool:
                stats = (await env.api.get(f"/v1/jobs/{job}"))["stats"]
                return int(stats.get("tasks_declined", 0)) >= 3

            await until(counted, "the coordinator counts the declines")
            hist = await redis.lrange(keys.history(ids[0]), 0, -1)
            hist += [h for d in ids[1:5] for h in await redis.lrange(keys.history(d), 0, -1)]
            assert any(str(h).endswith("|declined") for h in hist), hist
            await env.api.stop_job(job)
            st = fleet.stats()
            assert st["tasks_invalid"] == 0 and st["errors"] == {}, st

        # a device whose password is wrong is refused by the broker, and keeps trying slowly
        bad = dict(enrolled.credentials)
        bad[ids[0]] = _with_password(bad[ids[0]], "wrong")
        one = FleetSpec(devices=1, id_prefix=spec.id_prefix, keepalive_s=30)
        async with LeanFleet(one, mqtt_host=env.info.mqtt_host, mqtt_port=env.info.mqtt_port,
                             credentials=bad, ca_file=enrolled.ca_file) as refused:  # fmt: skip
            await until(lambda: refused.stats()["errors"].get("not_authorized"), "refusal")
            assert refused.connected() == 0
    finally:
        await redis.aclose()


async def _state(redis: Redis, keys: Keys, device_id: str, want: str) -> bool:
    return await redis.hget(keys.device(device_id), "state") == want


def _with_password(cred: Any, password: str) -> Any:
    import dataclasses

    return dataclasses.replace(cred, password=password)


@pytest.mark.integration
def test_loadtest_scale_with_lean_devices(stack: StackInfo, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``--device-mode lean`` through the pool's worker processes, in the secure default."""
    out = tmp_path / "scale"
    rc = main(["scale", "--devices", "300", "--processes", "1", "--rate", "150", "--duration",
               "3", "--storm-timeout", "60", "--device-mode", "lean", "--out", str(out), "--json",
               "--kafka", stack.kafka_bootstrap])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, summary
    assert summary["device_mode"] == "lean" and summary["secure"]
    assert summary["connect_storm"]["all_online_at_coordinator_s"] is not None
    assert summary["reconnect_storm"]["all_reconnected_s"] is not None
    assert summary["steady"]["lag_redis"]["samples"] > 0
    assert summary["steady"]["fleet_cpu_us_per_device_s"] > 0


def test_auto_mode_picks_lean_above_the_threshold() -> None:
    from loadtest.scale import ScaleSettings

    assert ScaleSettings(devices=1000).mode == "agent"
    assert ScaleSettings(devices=1001).mode == "lean"
    assert ScaleSettings(devices=50, device_mode="lean").mode == "lean"
    assert ScaleSettings(devices=50_000, device_mode="agent").mode == "agent"
    with pytest.raises(ValueError):
        ScaleSettings(device_mode="fast")


def test_pool_keeps_lean_slices_under_the_open_file_limit() -> None:
    from sim.lean_fleet import MAX_PER_PROCESS
    from sim.pool import FleetPool

    pool = FleetPool(FleetSpec(devices=40_000), processes=1, mqtt_host="h", mqtt_port=1,
                     api_url="u", log_dir=Path("/tmp"), device_mode="lean")  # fmt: skip
    assert pool.processes == 3 and max(s.devices for s in pool.slices()) <= MAX_PER_PROCESS
    with pytest.raises(ValueError):
        FleetPool(FleetSpec(), processes=1, mqtt_host="h", mqtt_port=1, api_url="u",
                  log_dir=Path("/tmp"), device_mode="fast")  # fmt: skip
    with pytest.raises(ValueError):
        LeanFleet(FleetSpec(devices=MAX_PER_PROCESS + 1), mqtt_host="h", mqtt_port=1)

