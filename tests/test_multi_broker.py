"""A fleet spread over several brokers (``schemas.brokers``, ``coordinator.multi_link``).

* the assignment (pure): deterministic, home first, a permutation; even spread, a dead
  broker's devices spread over all the others, growing the list moves few devices;
* ``MultiFleetLink`` on in-memory links: every link's messages reach one handler, a
  device is answered on the broker it was last heard on, else its first live broker;
* settings and enrolment: the broker list, the failover order a device is told;
* the agent's ``FailoverConnector`` on real Mosquittos: home broker down, it connects to
  the next one;
* two secure Mosquittos started by the stack (one fleet CA, one password file, one pid
  file), one coordinator: lean devices hashed to both are enrolled and seen, a job's tasks
  reach devices on both, and when one broker is stopped its devices fail over to the other
  and keep being seen (and reached).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from coordinator.keys import Keys
from coordinator.link import MemoryFleetLink
from coordinator.multi_link import MultiFleetLink, device_of
from coordinator.settings import CoordinatorSettings
from edge_agent.link import LinkConfig, LinkError
from edge_agent.mqtt_link import FailoverConnector, MqttConnector
from edge_agent.settings import AgentSettings
from loadtest.runner import Env, environment
from loadtest.scale import brokers_for
from schemas.brokers import Broker, broker_for, failover_order, home_index, parse_brokers
from schemas.errors import SettingsError
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.lean import LeanDevice
from sim.lean_fleet import LeanFleet
from stack import StackInfo, StackSettings
from stack.mqtt import Mosquitto, mosquitto_binary
from tests.test_lean_device import until as until_

GUARD_S = 30.0  # hang guard, never an expectation
IDS = [f"dev-{i}" for i in range(20_000)]


until = functools.partial(until_, timeout=GUARD_S)  # the lean tests' poll, a longer guard


# --------------------------------------------------------------------------- assignment


def test_the_order_is_deterministic_home_first_and_a_permutation() -> None:
    for d in IDS[:200]:
        order = failover_order(d, 5)
        assert sorted(order) == list(range(5))
        assert order[0] == home_index(d, 5)
        assert failover_order(d, 5) == order  # no state, no process-seeded hash()
    assert failover_order("anything", 1) == [0] and home_index("x", 1) == 0
    # pinned values: every process and version must agree on them (blake2b)
    assert failover_order("dev-0", 3) == [1, 2, 0]
    assert [home_index(d, 4) for d in ("a", "b", "c", "phone-1")] == [0, 3, 3, 2]
    with pytest.raises(ValueError):
        failover_order("x", 0)


def test_devices_spread_evenly_and_a_dead_brokers_devices_over_all_others() -> None:
    n = 4
    homes = Counter(home_index(d, n) for d in IDS)
    assert all(abs(c - len(IDS) / n) < 0.05 * len(IDS) / n for c in homes.values()), homes
    orphans = [d for d in IDS if home_index(d, n) == 0]  # broker 0 goes down
    second = Counter(failover_order(d, n)[1] for d in orphans)
    assert set(second) == {1, 2, 3}
    assert all(abs(c - len(orphans) / 3) < 0.1 * len(orphans) / 3 for c in second.values())


def test_growing_the_list_moves_only_the_new_brokers_share() -> None:
    moved = sum(1 for d in IDS if home_index(d, 3) != home_index(d, 4))
    assert 0.2 < moved / len(IDS) < 0.3  # ~1/4, all of them to the new broker
    assert all(home_index(d, 4) == 3 for d in IDS if home_index(d, 3) != home_index(d, 4))


def test_broker_lists_parse_and_order() -> None:
    bs = parse_brokers(["127.0.0.1:1883", " mqtts://h2:8884 ", "h3", ""])
    assert bs == (Broker("127.0.0.1", 1883), Broker("h2", 8884, True), Broker("h3", 1883))
    assert [b.address for b in broker_for("d", bs)] == \
        [bs[i].address for i in failover_order("d", 3)]  # fmt: skip
    with pytest.raises(SettingsError, match="twice"):
        parse_brokers(["h:1", "h:1"])
    with pytest.raises(SettingsError):
        parse_brokers(["h:notaport"])


def test_settings_list_every_broker_and_what_devices_are_told() -> None:
    one = CoordinatorSettings(mqtt_host="h", mqtt_port=1)
    assert one.brokers == (Broker("h", 1),) and one.device_brokers == (Broker("h", 1),)
    two = CoordinatorSettings.from_env({"FEDFLEET_MQTT_BROKERS": "a:1,b:2"})
    assert two.brokers == (Broker("a", 1), Broker("b", 2))
    told = two.replace(device_mqtt_urls=("mqtts://pub-a:8883", "mqtts://pub-b:8883"))
    assert told.device_brokers == (Broker("pub-a", 8883, True), Broker("pub-b", 8883, True))
    with pytest.raises(SettingsError):
        two.replace(device_mqtt_urls=("mqtts://pub-a:8883",))
    with pytest.raises(SettingsError):
        CoordinatorSettings(mqtt_brokers=("a:1", "a:1"))
    agent = AgentSettings(device_id="d", mqtt_failover=("b:2", "c:3"))
    assert agent.failover_brokers == [("b", 2), ("c", 3)]
    with pytest.raises(SettingsError):
        AgentSettings(device_id="d", mqtt_failover=("b:x",))


def test_the_scale_test_keeps_each_broker_below_15000() -> None:
    assert [brokers_for(n) for n in (1000, 15_000, 15_001, 100_000)] == [1, 1, 2, 7]
    assert brokers_for(20_000) == 3  # two could not hold 20,000 after losing one
    assert brokers_for(100_000, 3) == 3


# --------------------------------------------------------------------------- the link


async def test_multi_link_serves_every_broker_and_answers_where_a_device_is() -> None:
    a, b = MemoryFleetLink(), MemoryFleetLink()
    link = MultiFleetLink([a, b])
    got: list[str] = []

    async def handler(topic: str, payload: bytes) -> None:
        got.append(topic)

    serve = asyncio.create_task(link.serve(handler))
    try:
        await link.wait_ready(5)
        assert link.ready()
        on_b = next(d for d in IDS if home_index(d, 2) == 0)  # homed on a, heard on b
        b.send(f"fleet/{on_b}/telemetry", b"x")
        a.send("fleet/other/telemetry", b"y")
        await until(lambda: len(got) == 2, "both brokers' messages")
        await link.publish(f"fleet/{on_b}/task", b"t", 1)
        assert b.received(on_b, "task") == [b"t"] and a.received(on_b, "task") == []
        unheard = next(d for d in IDS if home_index(d, 2) == 1)
        await link.publish(f"fleet/{unheard}/task", b"u", 1)  # never heard: its home
        assert b.received(unheard, "task") == [b"u"]
        assert device_of("fleet/x/task") == "x" and device_of("$SYS/x") == ""
    finally:
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
    assert not link.ready()


async def test_a_down_broker_is_skipped_and_the_map_is_bounded() -> None:
    class Down(MemoryFleetLink):
        def ready(self) -> bool:
            return False

    up, down = MemoryFleetLink(), Down()
    link = MultiFleetLink([down, up], max_remembered=3)
    serve = asyncio.create_task(up.serve(lambda t, p: asyncio.sleep(0)))
    try:
        await up.wait_ready(5)
        homed_down = next(d for d in IDS if home_index(d, 2) == 0)
        link.heard(homed_down, 0)  # last heard on the broker that is now down
        assert link.broker_index(homed_down) == 1
        for i in range(10):
            link.heard(f"d{i}", 1)
        assert len(link._last) == 3  # the bound
    finally:
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)


# --------------------------------------------------------------------------- the agent


@pytest.fixture
async def two_plain(tmp_path: Path) -> AsyncIterator[list[Mosquitto]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    brokers = [Mosquitto(tmp_path / f"mqtt-{i}") for i in range(2)]
    try:
        for b in brokers:
            b.start()
        for b in brokers:
            await asyncio.to_thread(b.wait_ready)
        yield brokers
    finally:
        for b in brokers:
            b.stop()


async def test_the_agent_fails_over_and_starts_from_home_after_a_session(
    two_plain: list[Mosquitto],
) -> None:
    home, other = two_plain
    conns = [MqttConnector(host=b.host, port=b.port, timeout_s=3.0) for b in two_plain]
    fc = FailoverConnector(conns)
    cfg = LinkConfig(client_id="agent-fo")
    home.stop()
    with pytest.raises(LinkError):
        async with fc.connect(cfg):
            pass
    assert fc.broker is conns[1]  # the next attempt goes to the other broker
    async with fc.connect(cfg) as conn:
        assert conn.client is not None
    assert fc.broker is conns[0]  # after a session: home first again
    assert other.port != home.port


# --------------------------------------------------------------------------- end to end


@pytest.fixture
async def two_broker_env(stack: StackInfo) -> AsyncIterator[Env]:
    """The session's Kafka; two secure Mosquittos, a Redis and a coordinator of its own."""
    settings = StackSettings.from_env(kafka_url=stack.kafka_bootstrap, secure=True,
                                      mqtt_brokers=2)  # fmt: skip
    async with environment(settings, aggregators=0) as env:
        yield env


@pytest.mark.integration
async def test_one_coordinator_serves_devices_on_both_brokers_and_through_a_failover(
    two_broker_env: Env,
) -> None:
    env = two_broker_env
    info = env.info
    assert len(info.mqtt_brokers) == 2 and len(info.mqtt_pids) == 2 and info.mqtt_tls
    assert len(Path(info.mqtt_broker_pidfile).read_text().split()) == 2
    brokers = info.broker_addresses
    spec = FleetSpec(
        devices=16,
        telemetry_interval_s=0.5,
        connect_per_s=200.0,
        keepalive_s=10,
        id_prefix=f"mb{env.run_id}",
        reconnect_max_s=1.0,
        charging_share=1.0,
    )
    ids = spec.device_ids()
    homes = {d: home_index(d, 2) for d in ids}
    assert set(homes.values()) == {0, 1}, homes
    enrolled = await enrol_if_secure(env.http, env.services, ids)  # reloads both brokers
    assert enrolled.credentials is not None
    keys = Keys(env.services.redis_prefix)
    redis = Redis.from_url(info.redis_url, decode_responses=True)
    fleet = LeanFleet(spec, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
                      credentials=enrolled.credentials, ca_file=enrolled.ca_file,
                      brokers=brokers)  # fmt: skip
    by_id: dict[str, LeanDevice] = {}

    async def seen_since(t: float, which: list[str]) -> bool:
        rows = [await redis.hgetall(keys.device(d)) for d in which]
        return all(r.get("state") == "online" and float(r.get("ts") or 0) > t for r in rows)

    async def tasks_reach(job: str, which: list[str]) -> None:
        before = {d: by_id[d].last_task for d in which}
        body = {"job_id": job, "model_name": job, "shards": 1, "concurrency": len(ids),
                "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
                "eligibility": {"min_battery": 0, "allow_metered": True}}  # fmt: skip
        await env.api.create_job(body)
        await until(lambda: all(by_id[d].last_task != before[d] for d in which),
                    f"{job}'s tasks at {len(which)} devices")  # fmt: skip
        await env.api.stop_job(job)

    try:
        async with fleet:
            by_id = {d.device_id: d for d in fleet.devices}
            await until(lambda: fleet.connected() == 16, "16 devices connected over TLS")
            assert fleet.per_broker == [Counter(homes.values())[i] for i in (0, 1)]
            await until(lambda: seen_since(0, ids), "every device seen by the coordinator")
            await tasks_reach(f"mb0-{env.run_id}", ids)  # on both brokers

            # broker 1 stops: its devices fail over to broker 0 and keep being seen
            broker1 = next(
                s
                for s in env.launcher.servers
                if isinstance(s, Mosquitto) and s.port == brokers[1][1]
            )
            t_stop = time.time()
            await asyncio.to_thread(broker1.stop)
            moved = [d for d in ids if homes[d] == 1]
            await until(lambda: fleet.per_broker == [16, 0], "every device on broker 0")
            assert fleet.failovers >= len(moved)
            await until(lambda: seen_since(t_stop + 0.5, ids), "every device seen after it")
            r = await env.http.get(f"/v1/devices/{moved[0]}")
            assert r.status_code == 200 and r.json()["state"] != "offline", r.text
            await tasks_reach(f"mb1-{env.run_id}", moved)  # reached where they are now
            assert fleet.stats()["errors"].get("not_authorized") is None
    finally:
        await redis.aclose()
