"""schemas.settings (the one loader and boolean grammar), the error root, and the CLI's
answer to invalid settings of every service: one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from schemas import settings
from schemas.errors import FedfleetError, SchemaError, SettingsError


@dataclass(frozen=True, kw_only=True)
class Demo:
    name: str = "x"
    port: int = 1
    ratio: float = 0.5
    on: bool = False
    mode: Literal["a", "b"] = "a"
    cap: int | None = None
    where: Path | None = None
    cols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        settings.check(self.port >= 1, "port", f"must be >= 1, got {self.port}")


def test_one_boolean_grammar() -> None:
    for raw in ("1", "true", "YES", " on "):
        assert settings.parse_bool(raw) is True
    for raw in ("0", "False", "no", "OFF"):
        assert settings.parse_bool(raw) is False
    with pytest.raises(SettingsError) as e:
        settings.parse_bool("nope", "on")
    assert e.value.code == "on" and "not a boolean" in str(e.value)


def test_load_converts_by_type_hints_with_env_below_values() -> None:
    env = {"P_PORT": "7", "P_ON": "yes", "P_MODE": "b", "P_CAP": "", "P_COLS": "a, b,,c"}
    got = settings.load(Demo, env=env, prefix="P_", values={"ratio": "0.25", "name": None})
    assert got == Demo(port=7, on=True, mode="b", cap=None, ratio=0.25, cols=("a", "b", "c"))
    got = settings.load(Demo, env={"P_WHERE": "/tmp/x"}, prefix="P_", config={"port": 3})
    assert got.where == Path("/tmp/x") and got.port == 3


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"P_PORT": "1.5"}, "port"),
        ({"P_PORT": "0"}, "port"),  # the dataclass's own check
        ({"P_MODE": "c"}, "mode"),
        ({"P_ON": "maybe"}, "on"),
        ({"P_RATIO": "fast"}, "ratio"),
    ],
)
def test_bad_values_are_one_line_settings_errors(env: dict[str, str], code: str) -> None:
    with pytest.raises(SettingsError) as e:
        settings.load(Demo, env=env, prefix="P_")
    assert e.value.code == code and "\n" not in str(e.value)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(SettingsError) as e:
        settings.load(Demo, values={"prot": 1})
    assert e.value.code == "unknown" and "prot" in str(e.value)


def test_every_package_error_has_one_root_with_class_level_retriable() -> None:
    from aggregator.errors import AggregatorError, CheckpointError, ConfigError, UpdateRejected
    from coordinator.errors import CoordinatorError, UploadRejected
    from edge_agent.errors import AgentError, ModelFetchError, ModelRefused
    from edge_agent.errors import SettingsError as AgentSettingsError
    from stack.errors import StackError

    for cls in (AggregatorError, CoordinatorError, AgentError, SchemaError, StackError):
        assert issubclass(cls, FedfleetError)
    assert issubclass(ConfigError, SettingsError) and issubclass(AgentSettingsError, SettingsError)
    assert CheckpointError.retriable and ModelFetchError.retriable and not ModelRefused.retriable
    assert not issubclass(ModelFetchError, ModelRefused)
    e = UpdateRejected("too_stale", "base 3")
    assert (e.code, e.reason, str(e)) == ("too_stale", "too_stale", "too_stale: base 3")
    u = UploadRejected("bad_token", "x")
    assert (u.code, u.detail) == ("bad_token", "x")
    assert str(StackError("kafka did not start")) == "kafka did not start"
    assert str(CheckpointError("disk full")) == "checkpoint: disk full"


SERVICE_CASES = [
    (["aggregator", "--kafka", "127.0.0.1:1"], {"FEDFLEET_AGG_PUBLISH_EVERY": "0"},
     "publish_every"),
    (["aggregator", "--kafka", "127.0.0.1:1", "--robust", "bogus"], {}, "robust"),
    (["aggregator", "--kafka", "127.0.0.1:1", "--max-update-bytes", "-1"], {},
     "max_update_bytes"),
    (["aggregator", "--kafka", "127.0.0.1:1"], {"FEDFLEET_AGG_HISTORY_SIZE": "many"},
     "history_size"),
    (["coordinator", "--http-port", "70000"], {}, "http_port"),
    (["coordinator", "--http-port", "-1"], {}, "http_port"),
    (["coordinator", "--lease-s", "-1"], {}, "lease_s"),
    (["coordinator", "--max-shards", "0"], {}, "max_shards"),
    (["coordinator", "--telemetry-ttl-s", "0"], {}, "telemetry_ttl_s"),
    (["coordinator"], {"FEDFLEET_PACE_ENABLED": "sometimes"}, "pace_enabled"),
    # a bad --mqtt is reported as such, before the Kafka preflight
    (["coordinator", "--kafka", "127.0.0.1:1", "--mqtt", "http://x:1"], {}, "MQTT: scheme"),
    (["coordinator", "--kafka", "127.0.0.1:1", "--mqtt", "mqtts://x:1"], {}, "TLS"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "env", "field"), SERVICE_CASES)
def test_invalid_service_settings_print_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], field: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from fedfleet.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedfleet: error: ") and field in err[0], err


def test_the_real_command_exits_2_without_a_traceback() -> None:
    """The issue's example, as a user runs it (a process, not a function call)."""
    import os

    env = dict(os.environ, FEDFLEET_AGG_PUBLISH_EVERY="0")
    p = subprocess.run(
        [sys.executable, "-m", "fedfleet", "aggregator", "--kafka", "127.0.0.1:1"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr
    assert "publish_every" in p.stderr


def test_agent_settings_use_the_same_grammar(tmp_path: Path) -> None:
    from edge_agent.errors import SettingsError as AgentSettingsError
    from edge_agent.settings import AgentSettings

    got = AgentSettings.load({"device_id": "d1"}, env={"FEDFLEET_AGENT_METERED": "on"})
    assert got.metered is True
    with pytest.raises(AgentSettingsError) as e:
        AgentSettings.load({"device_id": "d1"}, env={"FEDFLEET_AGENT_INFERENCE": "nah"})
    assert e.value.code == "inference"
    with pytest.raises(AgentSettingsError) as e:
        AgentSettings.load({"device_id": "d1", "outbox": "cloud"})
    assert e.value.code == "outbox"
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndevice_id = "d9"\nmqtt_port = 1884\n')
    got = AgentSettings.load({"config": str(cfg)}, env={"FEDFLEET_AGENT_MQTT_PORT": "1885"})
    assert (got.device_id, got.mqtt_port) == ("d9", 1885)


def test_agent_takes_the_mqtt_address_as_every_command_does() -> None:
    """``--mqtt mqtt://host:port`` (what ``stack up`` prints) is host and port, not a host
    named ``mqtt://host`` retried forever; ``mqtts://`` is TLS (port 8883 by default); an
    unsupported scheme is a one-line refusal."""
    import argparse

    from edge_agent.cli import mqtt_address

    assert mqtt_address("mqtt://127.0.0.1:2883") == ("127.0.0.1", 2883, False)
    assert mqtt_address("10.0.0.5:1884") == ("10.0.0.5", 1884, False)
    assert mqtt_address("broker") == ("broker", 1883, False)
    assert mqtt_address("mqtts://broker") == ("broker", 8883, True)
    assert mqtt_address("mqtts://10.0.0.5:18883") == ("10.0.0.5", 18883, True)
    for bad, why in [("https://h:1", "scheme"), ("http://h:1", "scheme"), ("h:port", "port")]:
        with pytest.raises(argparse.ArgumentTypeError) as e:
            mqtt_address(bad)
        assert why in str(e.value)
