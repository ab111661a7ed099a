"""Settings from the environment, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings


def test_from_env_types_and_overrides() -> None:
    env = {
        "FEDFLEET_KAFKA_BOOTSTRAP": "10.0.0.1:9092",
        "FEDFLEET_MQTT_PORT": "1884",
        "FEDFLEET_LEASE_S": "7.5",
        "FEDFLEET_PACE_ENABLED": "false",
        "FEDFLEET_MODEL_STORE_DIR": "/tmp/x",
        "FEDFLEET_TOPIC_PREFIX": "t1.",
        "UNRELATED": "1",
    }
    s = CoordinatorSettings.from_env(env, admin_token="tok")
    assert s.kafka_bootstrap == "10.0.0.1:9092" and s.mqtt_port == 1884
    assert s.lease_s == 7.5 and s.pace_enabled is False
    assert s.model_store_dir == Path("/tmp/x") and s.admin_token == "tok"
    assert (s.jobs_topic, s.tasks_topic, s.updates_topic, s.models_topic) == (
        "t1.jobs", "t1.tasks", "t1.updates", "t1.models")  # fmt: skip
    assert s.key_prefix == "ff:t1." and s.share_group == "coord-t1"
    with pytest.raises(ValueError):
        CoordinatorSettings.from_env({"FEDFLEET_PACE_ENABLED": "maybe"})
    with pytest.raises(ValueError):
        CoordinatorSettings.from_env({"FEDFLEET_MQTT_PORT": "x"})


def test_defaults_follow_wire_contract() -> None:
    s = CoordinatorSettings()
    assert s.share_group == "coord" and s.jobs_topic == "fl.jobs"
    assert s.http_host == "127.0.0.1" and s.http_port == 8000
    assert s.replace(redis_prefix="k:").key_prefix == "k:"
    assert CoordinatorSettings(http_port=0).http_port == 0  # 0 still picks a free port


def test_agents_default_to_the_coordinators_default_port() -> None:
    """One default address: an agent started without --api reaches a coordinator started
    without --http-port (and so does `fedfleet job`)."""
    from edge_agent.settings import AgentSettings
    from fedfleet.job_client import Target
    from stack.envfile import DEFAULT_COORDINATOR_URL

    s = CoordinatorSettings()
    url = f"http://{s.http_host}:{s.http_port}"
    assert AgentSettings(device_id="d").api_url == url == DEFAULT_COORDINATOR_URL
    assert Target().url == url
