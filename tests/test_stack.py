"""The local stack launcher: start, health-check and stop real servers; no leftovers."""

from __future__ import annotations

import asyncio
import os

import pytest

from stack import LocalStack, StackSettings
from stack import kafka as kafka_mod
from stack import launcher as launcher_mod
from stack.errors import FallbackRefused, ServerUnavailable
from stack.kafka import kafka_brokers
from stack.mqtt import mqtt_ping
from stack.procs import free_port, pid_alive
from stack.redis import redis_ping


@pytest.mark.integration
def test_start_and_stop_leaves_no_process() -> None:
    launcher = LocalStack(StackSettings())
    info = launcher.start()
    try:
        assert info.pids and all(pid_alive(p) for p in info.pids)
        assert asyncio.run(kafka_brokers(info.kafka_bootstrap)) == 1
        asyncio.run(mqtt_ping(info.mqtt_host, info.mqtt_port))
        asyncio.run(redis_ping(info.redis_url))
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            assert (info.kafka_impl, info.mqtt_impl, info.redis_impl) == (
                "apache-kafka",
                "mosquitto",
                "redis-server",
            )
    finally:
        launcher.stop()
    assert not any(pid_alive(p) for p in info.pids)
    launcher.stop()  # idempotent


def test_kafka_cluster_id_never_looks_like_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base64url id starting with "-" made `kafka-storage format -t ID` fail (seen once
    in `fedfleet demo`); such draws are redrawn."""
    import uuid

    draws = iter([uuid.UUID(bytes=b"\xfb" + bytes(15)), uuid.UUID(bytes=bytes(16))])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    assert kafka_mod.random_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
    monkeypatch.undo()
    for _ in range(2000):
        cid = kafka_mod.random_cluster_id()
        assert not cid.startswith("-") and len(cid) == 22


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    """Outgoing connections take local ports from the ephemeral range, so a listener port
    chosen there can be stolen before the server binds it (seen in `fedfleet demo`)."""
    import socket

    from stack.procs import ephemeral_range

    lo, hi = ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 1
    for port in ports:
        assert not lo <= port <= hi
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_kafka_version_comes_from_the_repository_pom() -> None:
    """The launcher finds ``deploy/kafka/pom.xml`` from its own location in the tree."""
    assert kafka_mod.POM.is_file()
    assert kafka_mod.kafka_version().count(".") >= 1


def test_unreachable_external_server_is_one_line_error() -> None:
    port = free_port()
    settings = StackSettings(
        kafka_url=f"127.0.0.1:{port}", mqtt_url=f"mqtt://127.0.0.1:{port}",
        redis_url=f"redis://127.0.0.1:{port}/0",
    )  # fmt: skip
    with pytest.raises(ServerUnavailable) as err:
        LocalStack(settings).start()
    msg = str(err.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "Kafka" in msg


def test_require_real_refuses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_mod, "mosquitto_binary", lambda: None)
    settings = StackSettings(require_real=True, kafka_url="127.0.0.1:1", redis_url="redis://x:1")
    launcher = LocalStack(settings)
    with pytest.raises(FallbackRefused) as err:
        launcher.start()
    assert "mosquitto" in str(err.value)
    assert launcher.servers == []


@pytest.mark.integration
def test_three_node_kafka_survives_a_broker_kill() -> None:
    """`--kafka-nodes 3`: replicated topics keep accepting acks=all writes with a node down."""
    import signal

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    settings = StackSettings(
        kafka_nodes=3, kafka_heap_mb=384, mqtt_url=None, redis_url=None, require_real=False
    )
    launcher = LocalStack(settings)
    info = launcher.start()
    try:
        assert asyncio.run(kafka_brokers(info.kafka_bootstrap)) == 3
        kafka = launcher.servers[0]

        async def scenario() -> list[bytes]:
            admin = AIOKafkaAdminClient(bootstrap_servers=info.kafka_bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic("t3", 1, 3)])
            finally:
                await admin.close()
            prod = AIOKafkaProducer(
                bootstrap_servers=info.kafka_bootstrap, acks="all", enable_idempotence=True
            )
            await prod.start()
            try:
                await prod.send_and_wait("t3", b"before")
                os.kill(kafka.pids()[2], signal.SIGKILL)
                await prod.send_and_wait("t3", b"after")
            finally:
                await prod.stop()
            cons = AIOKafkaConsumer(bootstrap_servers=info.kafka_bootstrap)
            await cons.start()
            try:
                tp = TopicPartition("t3", 0)
                cons.assign([tp])
                await cons.seek_to_beginning(tp)
                batch = await cons.getmany(tp, timeout_ms=10_000)
                return [m.value for m in batch.get(tp, []) if m.value is not None]
            finally:
                await cons.stop()

        assert asyncio.run(scenario()) == [b"before", b"after"]
    finally:
        launcher.stop()
    assert not any(pid_alive(p) for p in info.pids)


def test_redis_keeps_its_data_across_kill9_and_restart(tmp_path: object) -> None:
    """The stack's Redis is durable by default (AOF, everysec): kill -9, start again on the
    same port and directory, and every acknowledged write is back."""
    import signal
    from pathlib import Path

    import redis

    from stack.redis import RedisServer, redis_binary

    if redis_binary() is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("redis-server is required")
        pytest.skip("no redis-server")
    srv = RedisServer(Path(str(tmp_path)))
    srv.start()
    try:
        srv.wait_ready()
        r = redis.Redis.from_url(srv.url)
        r.hset("ff:job:j1", mapping={"spec": "x", "status": "running"})
        for _ in range(1000):
            r.incr("ff:counter")
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
        r.close()
        assert srv.proc is not None and srv.proc.pid is not None
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.proc.wait(timeout=10)  # type: ignore[union-attr]
        srv.start()
        srv.wait_ready()
        r = redis.Redis.from_url(srv.url, decode_responses=True)
        assert r.hgetall("ff:job:j1") == {"spec": "x", "status": "running"}
        assert r.get("ff:counter") == "1000"
        r.close()
    finally:
        srv.stop()
