"""A topic root per deployment (``schemas.topics``): two coordinators on one broker do not
see each other's devices; the root reaches devices at enrolment and the broker's ACLs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from coordinator.metrics import counter_value
from coordinator.service import Coordinator
from edge_agent import credentials
from edge_agent.settings import AgentSettings
from schemas import dynsec, passwd
from schemas.errors import SettingsError
from schemas.messages import Task
from schemas.topics import check_root, from_wire, to_wire
from tests.test_coordinator_integration import (
    AUTH,
    Device,
    coordinator_settings,
    eventually,
)


def test_the_root_maps_canonical_topics_both_ways_and_nothing_else() -> None:
    assert to_wire("fleet/d1/task", "acme") == "acme/d1/task"
    assert from_wire("acme/d1/telemetry", "acme") == "fleet/d1/telemetry"
    assert to_wire("fleet/d1/task", "fleet") == "fleet/d1/task"
    assert from_wire("other/d1/telemetry", "acme") == "other/d1/telemetry"  # unknown_topic
    assert to_wire("$CONTROL/dynamic-security/v1", "acme") == "$CONTROL/dynamic-security/v1"
    assert to_wire("fleetx/d1/task", "acme") == "fleetx/d1/task"
    for bad in ("", "a/b", "+", "#", "$SYS", "x" * 65, "fleet/"):
        with pytest.raises(SettingsError):
            check_root(bad)


def test_acls_and_agent_topics_follow_the_root(tmp_path: Path) -> None:
    text = passwd.acl_text(("fleet", "acme"))
    assert "pattern write acme/%u/telemetry" in text and "pattern read fleet/%u/#" in text
    assert "topic write acme/+/task" in text and "topic read fleet/+/update" in text
    assert passwd.acl_text() == passwd.acl_text(("fleet",))
    role = dynsec.enrol_device("d1", "pw", "acme")[0]
    topics = {a["topic"] for a in role["acls"]}
    assert "acme/d1/telemetry" in topics and "acme/d1/#" in topics
    assert not any(t.startswith("fleet/") for t in topics)
    coord = dynsec.coordinator_role(("acme",))
    assert {a["topic"] for a in coord["acls"]} >= {"acme/+/update", "$share/+/acme/+/update",
                                                  "acme/+/task"}  # fmt: skip
    s = AgentSettings(device_id="d1", mqtt_topic_root="acme")
    assert s.topic("telemetry") == "acme/d1/telemetry"
    with pytest.raises(SettingsError):
        AgentSettings(device_id="d1", mqtt_topic_root="a/b")
    # a credential from enrolment carries the root; one written before roots were: "fleet"
    cred = credentials.DeviceCredential(
        device_id="d1", mqtt_host="h", mqtt_port=1, mqtt_tls=True, username="d1",
        password="pw", model_signing_key="00", api_url="http://x", enrolled_ts=1.0,
        mqtt_topic_root="acme",
    )  # fmt: skip
    credentials.save(tmp_path, cred, "not parsed here")
    applied = credentials.apply(AgentSettings(device_id="d1", state_dir=tmp_path))
    assert applied.topic("update") == "acme/d1/update"
    f = tmp_path / credentials.CREDENTIAL_FILE
    old = json.loads(f.read_text())
    del old["mqtt_topic_root"]
    f.write_text(json.dumps(old))
    os.chmod(f, 0o600)
    loaded = credentials.load(tmp_path)
    assert loaded is not None and loaded.mqtt_topic_root == "fleet"


class RootDevice(Device):
    """The scripted device of the integration tests, under a topic root of its own."""

    def __init__(self, dev_id: str, host: str, port: int, root: str) -> None:
        super().__init__(dev_id, host, port)
        self.root = root

    async def __aenter__(self) -> RootDevice:
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.root}/{self.id}/+", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def send(self, kind: str, msg: Any, qos: int = 1) -> None:
        from schemas.messages import encode

        await self.client.publish(f"{self.root}/{self.id}/{kind}", encode(msg), qos=qos)


@pytest.mark.integration
async def test_two_deployments_on_one_broker_see_only_their_own_devices(
    stack: Any, tmp_path: Path
) -> None:
    tag = f"{time.time_ns() % 10**8}"
    sa = coordinator_settings(stack, f"ra{tag}.", tmp_path / "a", lease_s=30.0).replace(
        mqtt_topic_root=f"fleet-a{tag}")
    sb = coordinator_settings(stack, f"rb{tag}.", tmp_path / "b", lease_s=30.0).replace(
        mqtt_topic_root=f"fleet-b{tag}")
    async with (
        Coordinator(sa) as a, Coordinator(sb) as b,
        RootDevice(f"x{tag}", stack.mqtt_host, stack.mqtt_port, sa.mqtt_topic_root) as da,
        RootDevice(f"y{tag}", stack.mqtt_host, stack.mqtt_port, sb.mqtt_topic_root) as db,
        httpx.AsyncClient(base_url=a.rest_url, timeout=10) as http,
    ):  # fmt: skip
        await da.hello()
        await db.hello()
        await eventually(lambda: a.fleet.get(da.id))
        await eventually(lambda: b.fleet.get(db.id))
        assert await a.fleet.get(db.id) is None
        assert await b.fleet.get(da.id) is None
        job = {"model_name": f"m{tag}", "shards": 1, "concurrency": 1,
               "spec": {"family": "softmax", "n_features": 4, "n_classes": 3}}  # fmt: skip
        r = await http.post("/v1/jobs", json=job, headers=AUTH)
        assert r.status_code == 201, r.text
        (task,) = await eventually(lambda: _got(da))  # on fleet-a<tag>/<id>/task
        assert task.device_id == da.id and task.upload_token
        assert not db.inbox.get("task")
        # B's traffic never reached A (not even as topics it does not know)
        assert counter_value(a.metrics.rejected, source="topic", reason="unknown_topic") == 0


async def _got(d: Device) -> list[Task] | None:
    return d.got("task", Task) or None


__all__ = ["aiomqtt"]
