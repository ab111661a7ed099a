"""The local stack launcher: start, health-check and stop real servers; no leftovers."""

from __future__ import annotations

import asyncio
import os

import pytest

from fedfleet.errors import FallbackRefused, ServerUnavailable
from fedfleet.stack import LocalStack, StackSettings
from fedfleet.stack import launcher as launcher_mod
from fedfleet.stack.kafka import kafka_brokers
from fedfleet.stack.mqtt import mqtt_ping
from fedfleet.stack.procs import free_port, pid_alive
from fedfleet.stack.redis import redis_ping


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
