"""The stack file (``stack.envfile``): written, read, printed as exports, removed, and read by
every command only where neither a flag nor an environment variable gives the value."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stack import StackInfo, StackSettings, envfile
from stack.errors import ConfigError

INFO = StackInfo(
    kafka_bootstrap="127.0.0.1:19092", mqtt_host="127.0.0.1", mqtt_port=11883,
    redis_url="redis://127.0.0.1:16379/0", kafka_impl="apache-kafka", mqtt_impl="mosquitto",
    redis_impl="redis-server", pids=(11, 12), workdir="/tmp/w",
)  # fmt: skip
SF = envfile.StackFile(info=INFO, coordinator_url="http://127.0.0.1:8000", admin_token="tok 1")
SERVICE_VARS = ("FEDFLEET_KAFKA_BOOTSTRAP", "FEDFLEET_MQTT_HOST", "FEDFLEET_MQTT_PORT",
                "FEDFLEET_REDIS_URL", "FEDFLEET_ADMIN_TOKEN", "FEDFLEET_AGG_KAFKA_BOOTSTRAP",
                "FEDFLEET_AGENT_MQTT_HOST", "FEDFLEET_AGENT_MQTT_PORT", "FEDFLEET_AGENT_API_URL",
                "FEDFLEET_COORDINATOR_URL", "FEDFLEET_KAFKA", "FEDFLEET_MQTT", "FEDFLEET_REDIS",
                "FEDFLEET_AGENT_CONFIG")  # fmt: skip


@pytest.fixture
def stack_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stack file location of this test's own, and no service variables set."""
    where = tmp_path / "st" / "stack.json"
    monkeypatch.setenv(envfile.ENV_VAR, str(where))
    for name in SERVICE_VARS:
        monkeypatch.delenv(name, raising=False)
    return where


# --------------------------------------------------------------------------- the file


def test_location_default_and_override(tmp_path: Path) -> None:
    assert envfile.path({"FEDFLEET_CACHE": "x"}).name == "stack.json"
    assert envfile.path({envfile.ENV_VAR: str(tmp_path / "s.json")}) == tmp_path / "s.json"


def test_write_read_remove_round_trip(stack_file: Path) -> None:
    assert envfile.read() is None
    assert envfile.write(SF) == stack_file
    assert stat.S_IMODE(stack_file.stat().st_mode) == 0o600  # it holds the admin token
    assert envfile.read() == SF
    assert envfile.remove() and not stack_file.exists() and not envfile.remove()


def test_a_file_that_is_not_a_stack_file_is_a_one_line_error(stack_file: Path) -> None:
    stack_file.parent.mkdir(parents=True)
    stack_file.write_text("[1, 2]")
    with pytest.raises(ConfigError) as e:
        envfile.read()
    assert str(stack_file) in str(e.value) and "\n" not in str(e.value)


def test_exports_are_the_services_own_variables_and_survive_a_shell() -> None:
    lines = envfile.exports(SF)
    assert all(line.startswith("export FEDFLEET_") for line in lines)
    script = "\n".join([*lines, 'printf "%s|%s|%s|%s" "$FEDFLEET_MQTT_PORT" '
                        '"$FEDFLEET_AGG_KAFKA_BOOTSTRAP" "$FEDFLEET_AGENT_API_URL" '
                        '"$FEDFLEET_ADMIN_TOKEN"'])  # fmt: skip
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "11883|127.0.0.1:19092|http://127.0.0.1:8000|tok 1"


def test_stack_env_command_prints_exports_or_says_there_is_none(stack_file: Path) -> None:
    env = dict(os.environ, **{envfile.ENV_VAR: str(stack_file)})
    cmd = [sys.executable, "-m", "fedfleet", "stack", "env"]
    none = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert none.returncode == 1 and "no stack file" in none.stderr
    envfile.write(SF)
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert got.returncode == 0, got.stderr
    assert "export FEDFLEET_REDIS_URL=redis://127.0.0.1:16379/0" in got.stdout.splitlines()


def test_down_removes_the_file(stack_file: Path) -> None:
    """``stack down`` of a recorded stack whose processes are gone: the file goes too."""
    gone = envfile.StackFile(info=dataclasses.replace(INFO, pids=(), workdir=""))
    envfile.write(gone)
    env = dict(os.environ, **{envfile.ENV_VAR: str(stack_file)})
    down = subprocess.run([sys.executable, "-m", "fedfleet", "stack", "down"], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert not stack_file.exists()


# --------------------------------------------------------------------------- precedence


def test_defaults_leave_out_what_the_environment_sets() -> None:
    fields = {"kafka_bootstrap", "mqtt_host", "mqtt_port", "redis_url", "admin_token"}
    got = envfile.defaults_for(envfile.COORDINATOR, fields, {}, SF)
    assert got == {"kafka_bootstrap": "127.0.0.1:19092", "mqtt_host": "127.0.0.1",
                   "mqtt_port": "11883", "redis_url": "redis://127.0.0.1:16379/0",
                   "admin_token": "tok 1"}  # fmt: skip
    env = {"FEDFLEET_REDIS_URL": "redis://r:1/0", "FEDFLEET_MQTT_HOST": "broker"}
    got = envfile.defaults_for(envfile.COORDINATOR, fields, env, SF)
    # the MQTT host and port are one address: env names the host, so the file gives neither
    assert got == {"kafka_bootstrap": "127.0.0.1:19092", "admin_token": "tok 1"}
    assert envfile.defaults_for(envfile.AGGREGATOR, {"kafka_bootstrap", "group_id"}, {}, SF) == {
        "kafka_bootstrap": "127.0.0.1:19092"}  # fmt: skip


def _service(argv: list[str]) -> object:
    from aggregator.settings import AggregatorSettings
    from coordinator.settings import CoordinatorSettings
    from fedfleet.cli import build_parser
    from fedfleet.services import build_settings

    args = build_parser().parse_args(argv)
    cls = CoordinatorSettings if argv[0] == "coordinator" else AggregatorSettings
    return build_settings(cls, args)


def test_services_take_flag_then_env_then_stack_file_then_default(
    stack_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator.settings import AggregatorSettings
    from coordinator.settings import CoordinatorSettings

    c: object = _service(["coordinator"])
    assert isinstance(c, CoordinatorSettings)
    assert c.kafka_bootstrap == "127.0.0.1:9092" and c.admin_token == "change-me"  # defaults
    envfile.write(SF)
    c = _service(["coordinator"])
    assert isinstance(c, CoordinatorSettings)
    assert (c.kafka_bootstrap, c.mqtt_port, c.redis_url, c.admin_token) == (
        "127.0.0.1:19092", 11883, "redis://127.0.0.1:16379/0", "tok 1")  # fmt: skip
    monkeypatch.setenv("FEDFLEET_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    monkeypatch.setenv("FEDFLEET_ADMIN_TOKEN", "from-env")
    c = _service(["coordinator", "--mqtt", "mqtt://b:1999", "--admin-token", "from-flag"])
    assert isinstance(c, CoordinatorSettings)
    assert (c.kafka_bootstrap, c.mqtt_host, c.mqtt_port, c.admin_token) == (
        "10.0.0.1:9092", "b", 1999, "from-flag")  # fmt: skip
    assert c.redis_url == "redis://127.0.0.1:16379/0"  # nobody else named it
    a = _service(["aggregator"])
    assert isinstance(a, AggregatorSettings) and a.kafka_bootstrap == "127.0.0.1:19092"
    a = _service(["aggregator", "--kafka", "k:1"])
    assert isinstance(a, AggregatorSettings) and a.kafka_bootstrap == "k:1"


def test_agent_gets_the_stack_file_below_flags_env_and_config(
    stack_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.settings import AgentSettings
    from fedfleet.agent_defaults import agent_env, stack_file_env

    assert agent_env([]) == {}  # no stack file
    envfile.write(SF)
    assert agent_env([]) == {"FEDFLEET_AGENT_MQTT_HOST": "127.0.0.1",
                             "FEDFLEET_AGENT_MQTT_PORT": "11883",
                             "FEDFLEET_AGENT_API_URL": "http://127.0.0.1:8000"}  # fmt: skip
    assert agent_env(["--mqtt", "h:1", "--api=http://x"]) == {}
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\nmqtt_port = 1884\n")
    assert agent_env(["--config", str(cfg)]) == {"FEDFLEET_AGENT_API_URL": "http://127.0.0.1:8000"}
    monkeypatch.setenv("FEDFLEET_AGENT_API_URL", "http://env:1")
    assert "FEDFLEET_AGENT_API_URL" not in agent_env([])
    monkeypatch.delenv("FEDFLEET_AGENT_API_URL")
    with stack_file_env(["--device-id", "d1"]):
        got = AgentSettings.load({"device_id": "d1"})
        assert (got.mqtt_port, got.api_url) == (11883, "http://127.0.0.1:8000")
    assert "FEDFLEET_AGENT_MQTT_PORT" not in os.environ  # only while the command ran


def test_demo_and_loadtest_use_the_stack_file_for_servers_nobody_named(stack_file: Path) -> None:
    s = StackSettings(kafka_url="k:1")
    assert envfile.with_stack_file(s) == s  # no stack file: start the others locally
    envfile.write(SF)
    got = envfile.with_stack_file(s)
    assert (got.kafka_url, got.mqtt_url, got.redis_url) == (
        "k:1", "mqtt://127.0.0.1:11883", "redis://127.0.0.1:16379/0")  # fmt: skip
    from loadtest.cli import build_parser, stack_settings

    args = build_parser().parse_args(["churn", "--insecure", "--redis", "redis://x:1/0"])
    ls = stack_settings(args)
    assert (ls.kafka_url, ls.redis_url) == ("127.0.0.1:19092", "redis://x:1/0")
    assert not ls.secure
    # a Redis fault kills the embedded redis-server: never one from the stack file
    fo = stack_settings(build_parser().parse_args(["failover", "--insecure", "--fault", "redis"]))
    assert fo.redis_url is None and fo.kafka_url is None
    # the secure default: a broker and Redis of its own, whatever the stack file says
    sec = stack_settings(build_parser().parse_args(["churn"]))
    assert sec.secure and sec.mqtt_url is None and sec.redis_url is None
    with pytest.raises(ConfigError, match="--insecure"):
        stack_settings(build_parser().parse_args(["scale", "--mqtt", "mqtt://x:1"]))
    wipe = stack_settings(build_parser().parse_args(["failover", "--fault", "redis-wipe"]))
    assert wipe.secure  # the credentials come back from the coordinator's journal
