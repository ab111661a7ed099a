"""deploy/ stays in step with the code: the broker's ACL is what the coordinator's password
file store expects, every FEDFLEET_* variable of the compose file is a setting of its
service, and `fedfleet deploy init` writes the files a secure deployment starts from."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

import yaml

from aggregator.settings import ENV_PREFIX as AGG_PREFIX
from aggregator.settings import AggregatorSettings
from coordinator.settings import CoordinatorSettings
from coordinator.tasks import load_task_key
from fedfleet.cli import main
from fedfleet.deploy_cli import init
from schemas import passwd
from schemas.dynsec import COORDINATOR_USER

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    return doc


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_deployed_acl_is_the_one_the_coordinator_expects() -> None:
    assert (DEPLOY / "mosquitto" / "acl").read_text() == passwd.acl_text()


def test_the_broker_config_is_tls_only_with_the_password_file_and_acl() -> None:
    lines = [ln.split("#")[0].strip() for ln in
             (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()]  # fmt: skip
    conf = [ln for ln in lines if ln]
    assert "allow_anonymous false" in conf
    listeners = [ln for ln in conf if ln.startswith("listener ")]
    assert listeners == ["listener 8883"]  # no plain-TCP listener
    for key in ("cafile", "certfile", "keyfile", "password_file", "acl_file"):
        assert any(ln.startswith(key + " ") for ln in conf), key


def test_every_compose_variable_is_a_setting_of_its_service() -> None:
    services = _compose()["services"]
    coord = services["coordinator"]["environment"]
    agg = services["aggregator"]["environment"]
    unknown = [k for k in coord if k.removeprefix("FEDFLEET_").lower()
               not in _fields(CoordinatorSettings)]  # fmt: skip
    unknown += [k for k in agg if k.removeprefix(AGG_PREFIX).lower()
                not in _fields(AggregatorSettings)]  # fmt: skip
    assert unknown == []
    # the coordinator runs secure: TLS to the broker, its password store, enrolled devices
    assert coord["FEDFLEET_REQUIRE_ENROLMENT"] == "true"
    assert coord["FEDFLEET_MQTT_PORT"] == "8883"
    for key in ("MQTT_CAFILE", "MQTT_PASSWD_FILE", "MQTT_BROKER_PIDFILE", "TLS_CERTFILE",
                "TASK_KEY_PATH"):  # fmt: skip
        assert coord["FEDFLEET_" + key].startswith("/fleet/"), key
    # the paths the services read are the ones the broker config and init write
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert "password_file /fleet/mqtt/passwd" in conf
    assert coord["FEDFLEET_MQTT_PASSWD_FILE"] == "/fleet/mqtt/passwd"
    assert "/fleet/mqtt/mosquitto.pid" in " ".join(services["mosquitto"]["entrypoint"])


def test_deploy_init_writes_owner_only_secrets_and_keeps_them_on_a_second_run(
    tmp_path: Path,
) -> None:
    out = init(tmp_path / "fleet", ["mosquitto", "coordinator"])
    secret = Path(out["coordinator_secret"]).read_text()
    entries = passwd.parse(Path(out["passwd"]).read_text())
    assert passwd.verify(entries[COORDINATOR_USER], secret)
    assert Path(out["acl"]).read_text() == passwd.acl_text()
    for key in ("coordinator_secret", "passwd", "server_key", "task_key", "admin_token"):
        mode = stat.S_IMODE(Path(out[key]).stat().st_mode)
        assert mode == 0o600, (key, oct(mode))
    task_key = load_task_key(Path(out["task_key"]))
    ca = Path(out["ca"]).read_bytes()
    assert main(["deploy", "init", str(tmp_path / "fleet"), "--host", "other"]) == 0
    assert Path(out["coordinator_secret"]).read_text() == secret  # enrolments survive
    assert load_task_key(Path(out["task_key"])) == task_key
    assert Path(out["ca"]).read_bytes() == ca  # devices keep trusting the same CA
