"""Only the fleet gets in (issue 16), on the real stack in its secure mode: Mosquitto with TLS
from the fleet CA, no anonymous access and the dynamic-security plugin; the coordinator
(``fedfleet coordinator`` as a process) connects with its own credential and enrols devices.

* devices enrol with one-use operator tokens (``fedfleet agent enrol``'s code path), store
  their credential owner-only, connect over TLS with it and train a job to its end; some
  upload over HTTP with their credential (Basic auth), the rest over MQTT;
* a reused, an expired, an unknown and a foreign-bound token are refused (403 with the
  reason), an enrolled id cannot enrol twice (409), REST operator endpoints answer 401
  without the admin token; each refusal has its counter in ``/metrics``;
* an anonymous client and a plain-TCP client cannot talk to the broker; REST is HTTPS only
  (a plain HTTP client, and a TLS client that does not trust the fleet CA, get nowhere),
  and fleet-status reads need the operator's token;
* a revoked device is disconnected, cannot reconnect, leaves the fleet view, and its
  credential no longer authorises an HTTP upload.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from edge_agent import credentials
from edge_agent.agent import EdgeAgent
from edge_agent.data import load_dataset
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from fedfleet.example_data import write_example
from schemas.messages import Update, UpdateChunk, encode
from schemas.mqtt_auth import MqttCredentials
from sim.services import ServiceSet
from stack import LocalStack, StackInfo, StackSettings
from tests.csv_fleet import ADMIN, AUTH, Fleet, run_job, until
from tests.secure_broker import require_dynsec

pytestmark = pytest.mark.integration
DEVICES = 6
GUARD_S = 15.0  # hang guard, never an expectation


@pytest.fixture(scope="module")
def secure_stack(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """The session's Kafka and Redis, and a broker of its own in the secure mode."""
    require_dynsec()
    workdir = tmp_path_factory.mktemp("securestack")
    settings = StackSettings(kafka_url=stack.kafka_bootstrap, redis_url=stack.redis_url,
                             secure=True, workdir=workdir)  # fmt: skip
    with LocalStack(settings) as info:
        yield info


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        got = head[len(name):].strip("{}")
        if ",".join(sorted(got.split(","))) == want:
            return float(value)
    return 0.0


async def tokens(http: httpx.AsyncClient, **body: Any) -> list[str]:
    r = await http.post("/v1/enrolment-tokens", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return list(r.json()["tokens"])


def agent_for(cred_dir: Path, device_id: str, data: Path, api: str, seed: int,
              **extra: Any) -> EdgeAgent:  # fmt: skip
    s = credentials.apply(AgentSettings(
        device_id=device_id, api_url=api, state_dir=cred_dir, telemetry_interval_s=1.0,
        inference=False, seed=seed, data_path=data, outbox="memory", **extra,
    ))  # fmt: skip
    probe = SimulatedProbe(seed=seed, battery=95.0, charging=True, network="wifi", metered=False)
    return EdgeAgent(s, probe, load_dataset(data, label_col=s.label_column))


async def refused(host: str, port: int, **kw: Any) -> bool:
    """True when the broker refuses this CONNECT (or the handshake), False if it lets it in."""
    try:
        async with aiomqtt.Client(host, port, identifier="", timeout=GUARD_S, **kw):
            return False
    except aiomqtt.MqttError:
        return True


async def test_enrolled_devices_train_over_tls_and_a_revoked_one_is_cut_off(
    secure_stack: StackInfo, unique_prefix: str, tmp_path: Path
) -> None:
    info, p = secure_stack, unique_prefix
    assert info.mqtt_tls and info.mqtt_url.startswith("mqtts://")
    data = tmp_path / "data"
    body = write_example("breast_cancer", data, devices=DEVICES, seed=3, standardized=True)
    csvs = sorted(data.glob("dev*.csv"))
    services = ServiceSet(info, tmp_path / "svc", aggregators=1, admin_token=ADMIN, topic_prefix=p)
    try:
        await services.start()
        assert services.rest_url.startswith("https://")
        plain = services.rest_url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=GUARD_S) as tcp:  # plain HTTP to the TLS port
            with pytest.raises(httpx.HTTPError):
                await tcp.get(f"{plain}/healthz")
            with pytest.raises(httpx.ConnectError):  # TLS, but not trusting the fleet CA
                await tcp.get(f"{services.rest_url}/healthz")
        async with httpx.AsyncClient(base_url=services.rest_url, timeout=30,
                                     verify=services.verify) as anon:  # fmt: skip
            r = await anon.get("/v1/fleet")  # fleet status is for operators only
            assert r.status_code == 401, r.text
            assert (await anon.get(f"/v1/devices/{p}x")).status_code == 401
        async with httpx.AsyncClient(base_url=services.rest_url, timeout=30,
                                     verify=services.verify, headers=AUTH) as http:  # fmt: skip
            await _run(http, services, info, p, body, csvs, tmp_path)
    finally:
        services.stop()


async def _run(http: httpx.AsyncClient, services: ServiceSet, info: StackInfo, p: str,
               body: dict[str, Any], csvs: list[Path], tmp_path: Path) -> None:  # fmt: skip
    api = services.rest_url
    ca = Path(info.mqtt_cafile)
    # --- the broker lets no one in without a credential, and never in plain TCP
    assert await refused(info.mqtt_host, info.mqtt_port)  # plain TCP to the TLS listener
    assert await refused(info.mqtt_host, info.mqtt_port, tls_context=MqttCredentials(
        "x", "y", ca).tls_context())  # TLS, anonymous  # fmt: skip

    # --- operator endpoints need the admin token
    bad = {"Authorization": "Bearer wrong"}
    r = await http.post("/v1/enrolment-tokens", json={"count": 1}, headers=bad)
    assert r.status_code == 401, r.text
    r = await http.post("/v1/devices/whoever/revoke", headers=bad)
    assert r.status_code == 401, r.text

    # --- enrolment: one-use tokens for one credential per device
    ids = [f"{p.strip('.')}-dev{i}" for i in range(len(csvs))]
    dirs = [tmp_path / "devices" / d for d in ids]
    toks = await tokens(http, count=len(ids), ttl_s=600, label="test fleet")
    for tok, dev, d in zip(toks, ids, dirs, strict=True):
        cred = await credentials.enrol(http, api, tok, dev, d)
        assert cred.device_id == dev and cred.mqtt_tls and cred.model_signing_key
        assert cred.api_url.startswith("https://")
        assert stat.S_IMODE((d / credentials.CREDENTIAL_FILE).stat().st_mode) == 0o600
        assert "password" not in repr(cred) and cred.password not in repr(cred)
    refusals = [
        ({"token": toks[0], "device_id": f"{p.strip('.')}-other"}, 403, "token_used"),
        ({"token": "not-a-token", "device_id": f"{p.strip('.')}-other"}, 403, "token_unknown"),
    ]
    (bound,) = await tokens(http, device_id=f"{p.strip('.')}-bound")
    refusals.append(({"token": bound, "device_id": f"{p.strip('.')}-thief"}, 403, "token_device"))
    (again,) = await tokens(http)
    refusals.append(({"token": again, "device_id": ids[0]}, 409, "already_enrolled"))
    (short,) = await tokens(http, ttl_s=0.2)
    await asyncio.sleep(0.5)
    refusals.append(({"token": short, "device_id": f"{p.strip('.')}-late"}, 403, "token_expired"))
    for req, status, reason in refusals:
        r = await http.post("/v1/enrol", json=req)
        assert r.status_code == status and reason in r.json()["detail"], (req, r.text)
    r = await http.post("/v1/enrol", json={"token": again, "device_id": "a/b"})
    assert r.status_code == 422, r.text

    # --- the enrolled fleet trains over TLS; half of it uploads over HTTP (Basic auth)
    agents = [agent_for(d, dev, csv, api, i, http_upload_min_bytes=0 if i % 2 else 512 << 10)
              for i, (d, dev, csv) in enumerate(zip(dirs, ids, csvs, strict=True))]  # fmt: skip
    job_body = {**body, "model_name": f"{p}secure", "shards": 1, "concurrency": 4,
                "train": {"lr": 0.05, "local_epochs": 2, "batch_size": 8},
                "stop": {"max_updates": 60}, "evaluation": {"devices": 0}}  # fmt: skip
    job = await run_job(Fleet(services, http, p), agents, job_body)
    assert job["status"] == "completed" and job["updates_applied"] >= 60, job
    assert sum(a.stats.updates_sent_http for a in agents) > 0
    assert sum(a.stats.updates_sent - a.stats.updates_sent_http for a in agents) > 0

    # --- revocation: the device is cut off now and refused from then on
    victim = agent_for(dirs[1], ids[1], csvs[1], api, 1)
    async with victim:
        await until(lambda: _truthy(victim.connected), 30)
        r = await http.post(f"/v1/devices/{ids[1]}/revoke", headers=AUTH)
        assert r.status_code == 200, r.text
        await until(lambda: _truthy(not victim.connected), 30)
        # its reconnect is refused as a credential the broker does not take (not as a
        # network fault: it backs off to the slowest pace)
        await until(lambda: _truthy(victim.stats.errors.get("not_authorized", 0) >= 1), 30)
        assert not victim.connected
    vs = victim.settings
    creds = MqttCredentials(vs.mqtt_username, vs.mqtt_password, ca)
    assert await refused(info.mqtt_host, info.mqtt_port, **creds.client_kwargs())
    other = agents[2].settings
    assert not await refused(info.mqtt_host, info.mqtt_port, **MqttCredentials(
        other.mqtt_username, other.mqtt_password, ca).client_kwargs())  # fmt: skip
    assert (await http.get(f"/v1/devices/{ids[1]}")).status_code == 404
    r = await http.post(f"/v1/devices/{ids[1]}/revoke", headers=AUTH)
    assert r.status_code == 404, r.text
    chunk = UpdateChunk(shard=0, start=0, stop=1, base_version=0, payload=b"x")
    upd = Update(update_id="u-revoked", task_id="t-none", job_id="j", device_id=ids[1],
                 num_samples=1, chunks=[chunk], upload_token="x", sent_ts=time.time())  # fmt: skip
    r = await http.post("/v1/uploads", content=encode(upd),
                        auth=(vs.mqtt_username, vs.mqtt_password))  # fmt: skip
    assert r.status_code == 401, r.text
    r = await http.post("/v1/uploads", content=encode(upd))
    assert r.status_code == 401, r.text
    good = agents[3].settings
    r = await http.post("/v1/uploads", content=encode(upd),
                        auth=(good.mqtt_username, good.mqtt_password))  # fmt: skip
    assert r.status_code == 403, r.text  # a valid credential, but another device's update

    # --- every refusal is counted
    text = (await http.get("/metrics")).text
    for reason in ("token_used", "token_unknown", "token_device", "token_expired",
                   "already_enrolled", "invalid_request"):  # fmt: skip
        assert metric(text, "fedfleet_coord_enrolments_total", outcome=reason) >= 1, reason
    assert metric(text, "fedfleet_coord_enrolments_total", outcome="enrolled") >= len(ids)
    assert metric(text, "fedfleet_coord_revocations_total") >= 1
    assert metric(text, "fedfleet_coord_auth_refused_total", what="device", reason="wrong") >= 1
    assert metric(text, "fedfleet_coord_auth_refused_total", what="device",
                  reason="missing") >= 1  # fmt: skip
    assert metric(text, "fedfleet_coord_auth_refused_total", what="device",
                  reason="device_mismatch") >= 1  # fmt: skip
    assert metric(text, "fedfleet_coord_auth_refused_total", what="admin", reason="wrong") >= 1
    assert metric(text, "fedfleet_coord_auth_refused_total", what="operator",
                  reason="missing") >= 1  # fmt: skip


async def _truthy(v: bool) -> bool:
    return v
