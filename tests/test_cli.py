"""The `fedfleet` command: one-line errors for unreachable servers; detached stack lifecycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stack import StackInfo
from stack.procs import free_port, pid_alive


def fedfleet(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("service", ["coordinator", "aggregator"])
def test_unreachable_kafka_is_a_one_line_error(service: str) -> None:
    port = free_port()
    res = fedfleet(service, "--kafka", f"127.0.0.1:{port}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fedfleet: error: Kafka:") and f"127.0.0.1:{port}" in lines[0]


def test_bad_flag_value_is_rejected() -> None:
    res = fedfleet("demo", "--devices", "many")
    assert res.returncode == 2 and "invalid int value" in res.stderr


@pytest.mark.integration
def test_detached_stack_up_status_down(tmp_path: Path) -> None:
    env = dict(os.environ, FEDFLEET_CACHE=str(tmp_path / "cache"))
    env.pop("FEDFLEET_STACK_FILE", None)
    # Reuse the jars already fetched for this session instead of a second download.
    from stack.kafka import cache_root, kafka_version

    src = cache_root() / f"kafka-{kafka_version()}"
    if src.exists():
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / src.name).symlink_to(src)
    up = fedfleet("stack", "up", "--detach", "--json", env=env, timeout=180)
    assert up.returncode == 0, up.stderr + up.stdout
    info = StackInfo.from_json(up.stdout.strip().splitlines()[-1])
    stack_file = tmp_path / "cache" / "stack" / "stack.json"  # the default, under the cache
    try:
        assert info.pids and all(pid_alive(p) for p in info.pids)
        status = fedfleet("stack", "status", env=env)
        assert status.returncode == 0, status.stdout
        recorded = json.loads(stack_file.read_text())
        assert recorded["kafka_bootstrap"] == info.kafka_bootstrap and recorded["admin_token"]
        # secure by default: TLS broker with its password file, HTTPS, no banner
        assert recorded["coordinator_url"] == "https://127.0.0.1:8000"
        assert info.mqtt_tls and info.mqtt_passwd_file and info.mqtt_broker_pidfile
        assert "INSECURE" not in up.stderr
        exports = fedfleet("stack", "env", env=env)
        assert exports.returncode == 0, exports.stderr
        assert f"export FEDFLEET_AGG_KAFKA_BOOTSTRAP={info.kafka_bootstrap}" in exports.stdout
        again = fedfleet("stack", "up", "--detach", env=env)
        assert again.returncode == 2 and "already recorded" in again.stderr
    finally:
        down = fedfleet("stack", "down", env=env, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert json.loads(down.stdout.strip().splitlines()[-1])["left"] == []
    assert not any(pid_alive(p) for p in info.pids)
    assert not stack_file.exists()
    assert fedfleet("stack", "status", env=env).returncode == 1
    assert fedfleet("stack", "env", env=env).returncode == 1


def test_demo_stop_rule_needs_versions_and_a_full_generation_of_updates() -> None:
    from fedfleet.demo import DemoSettings, stable

    s = DemoSettings(stable_versions=3, concurrency=20)
    assert not stable(2, 50, s)  # too few versions
    assert not stable(3, 39, s)  # fewer than two generations of in-flight uploads seen
    assert stable(3, 40, s) and stable(8, 41, s)


def test_agent_enrol_waits_for_the_coordinator_then_says_it_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``agent enrol --wait S`` polls /readyz of a coordinator that is not up yet; when it
    never comes, the enrolment fails with one typed line, no traceback, no token spent."""
    from edge_agent.cli import main

    api = f"http://127.0.0.1:{free_port()}"
    rc = main(["enrol", "--api", api, "--token", "t", "--device-id", "d1",
               "--state-dir", str(tmp_path / "d1"), "--wait", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "enrol_unreachable" in err and "Traceback" not in err
    assert not (tmp_path / "d1" / "credential.json").exists()
