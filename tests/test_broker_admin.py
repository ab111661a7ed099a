"""The ``BrokerAdmin`` port: one contract for the real adapters (Mosquitto's password file
and its dynamic-security plugin, in the secure mode) and the in-memory one; then the enrolment flow
(``coordinator.enrolment``) on the real Redis with the in-memory broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from coordinator.broker_admin import BrokerAdmin, DynsecBrokerAdmin, MemoryBrokerAdmin
from coordinator.broker_passwd import PasswdBrokerAdmin
from coordinator.enrolment import Enroller, EnrolmentStore
from coordinator.errors import EnrolmentRefused, EnrolmentUnavailable, NotFound
from coordinator.fleet import FleetStore
from coordinator.ingest import TelemetryBatcher
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.redis_client import redis_client
from schemas.dynsec import DynsecError
from schemas.messages import Telemetry
from schemas.mqtt_auth import MqttCredentials
from stack.mqtt import Mosquitto
from tests.secure_broker import secure_mosquitto
from tests.test_coordinator_support import redis_url

__all__ = ["redis_url"]  # fixture

GUARD_S = 15.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with secure_mosquitto(tmp_path_factory.mktemp("admin") / "mqtt") as server:
        yield server


@pytest.fixture(scope="module")
def passwd_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with secure_mosquitto(tmp_path_factory.mktemp("admin-pw") / "mqtt", auth="passwd") as srv:
        yield srv


@pytest.fixture(params=["memory", "dynsec", "passwd"])
def admin(request: pytest.FixtureRequest) -> BrokerAdmin:
    """Each adapter; a real one opens its session on first use (closed by the test)."""
    if request.param == "memory":
        return MemoryBrokerAdmin()
    if request.param == "passwd":
        pw: Mosquitto = request.getfixturevalue("passwd_broker")
        assert pw.credentials is not None
        return PasswdBrokerAdmin(pw.passwd_file, pw.pid_file, pw.host, pw.port,
                                 pw.credentials.cafile)  # fmt: skip
    broker: Mosquitto = request.getfixturevalue("broker")  # sync: before the test's loop
    assert broker.credentials is not None
    return DynsecBrokerAdmin(broker.host, broker.port, broker.credentials)


def telemetry(device_id: str, ts: float) -> Telemetry:
    """A healthy device's report (always eligible)."""
    return Telemetry(device_id=device_id, battery=80.0, charging=True, network="wifi",
                     metered=False, bandwidth_kbps=1000.0, rtt_ms=20.0, idle=True,
                     ts=ts)  # fmt: skip


def new_id() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


async def test_contract_enrol_replace_revoke(admin: BrokerAdmin) -> None:
    try:
        await _contract(admin)
    finally:
        if isinstance(admin, DynsecBrokerAdmin | PasswdBrokerAdmin):
            await admin.close()


async def _contract(admin: BrokerAdmin) -> None:
    dev = new_id()
    assert not await admin.has_client(dev)
    await admin.enrol(dev, "first-secret")
    assert await admin.has_client(dev)
    await admin.enrol(dev, "second-secret")  # a new credential replaces the old one
    assert await admin.has_client(dev)
    await admin.revoke(dev)
    assert not await admin.has_client(dev)
    await admin.revoke(dev)  # idempotent
    for bad in ("a/b", "fleet/#", "+", "coordinator", "coordinator-probe", ""):
        with pytest.raises(DynsecError):
            await admin.enrol(bad, "pw")


async def _connects(broker: Mosquitto, user: str, password: str) -> bool:
    assert broker.credentials is not None
    creds = MqttCredentials(user, password, broker.credentials.cafile)
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"{user}-x",
                                  timeout=GUARD_S, **creds.client_kwargs()):  # fmt: skip
            return True
    except aiomqtt.MqttError:
        return False


async def test_real_admin_credentials_are_what_the_broker_checks(broker: Mosquitto) -> None:
    assert broker.credentials is not None
    dev = new_id()
    async with DynsecBrokerAdmin(broker.host, broker.port, broker.credentials) as admin:
        await admin.enrol(dev, "first-secret")
        assert await _connects(broker, dev, "first-secret")
        await admin.enrol(dev, "second-secret")
        assert not await _connects(broker, dev, "first-secret")
        assert await _connects(broker, dev, "second-secret")
        await admin.revoke(dev)
        assert not await _connects(broker, dev, "second-secret")


async def test_real_admin_unreachable_broker_is_a_dynsec_error(tmp_path: Path) -> None:
    creds = MqttCredentials("coordinator", "pw", tmp_path / "missing-ca.pem")
    admin = DynsecBrokerAdmin("127.0.0.1", 9, creds, timeout=2.0)
    with pytest.raises((DynsecError, OSError)):
        await admin.has_client("dev-1")
    await admin.close()


# ------------------------------------------------------------------ the enrolment flow


@pytest_asyncio.fixture
async def flow(redis_url: str, unique_prefix: str) -> AsyncIterator[tuple[Enroller, Redis]]:
    """The enrolment flow on a single Redis and on a Redis Cluster (``redis_url``)."""
    redis = redis_client(redis_url)
    metrics = CoordinatorMetrics(CollectorRegistry())
    fleet = FleetStore(redis, f"ff:{unique_prefix}", 60.0)
    enroller = Enroller(EnrolmentStore(redis, f"ff:{unique_prefix}"), MemoryBrokerAdmin(),
                        fleet, metrics, probation_s=300.0)  # fmt: skip
    try:
        yield enroller, redis
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_tokens_are_single_use_bound_and_expire(flow: tuple[Enroller, Redis]) -> None:
    enroller, _ = flow
    broker = enroller.broker
    assert isinstance(broker, MemoryBrokerAdmin)
    (tok,), _ = await enroller.issue(1, 600)
    password, _ = await enroller.enrol(tok, "dev-a")
    assert broker.accepts("dev-a", password)
    assert await enroller.store.verify("dev-a", password)
    assert not await enroller.store.verify("dev-a", password + "x")
    refused = {}
    for token, dev in [(tok, "dev-b"), ("nope", "dev-b")]:
        with pytest.raises(EnrolmentRefused) as e:
            await enroller.enrol(token, dev)
        refused[token] = e.value.code
    assert refused == {tok: "token_used", "nope": "token_unknown"}
    (bound,), _ = await enroller.issue(1, 600, device_id="dev-c")
    with pytest.raises(EnrolmentRefused, match="token_device"):
        await enroller.enrol(bound, "dev-d")
    await enroller.enrol(bound, "dev-c")  # a refused attempt does not use the token up
    (dup,), _ = await enroller.issue(1, 600)
    with pytest.raises(EnrolmentRefused, match="already_enrolled"):
        await enroller.enrol(dup, "dev-a")
    tokens, _ = await enroller.store.issue(1, 600, now=0.0)  # issued long ago
    with pytest.raises(EnrolmentRefused, match="token_expired"):
        await enroller.enrol(tokens[0], "dev-e")
    for bad in ("coordinator", "a/b"):
        with pytest.raises(EnrolmentRefused):
            await enroller.enrol(dup, bad)
    m = enroller.metrics.enrolments
    assert counter_value(m, outcome="enrolled") == 2
    assert counter_value(m, outcome="token_used") == 1
    assert counter_value(m, outcome="reserved_id") == 1 and counter_value(m, outcome="bad_id") == 1


@pytest.mark.integration
async def test_broker_down_gives_the_token_back(flow: tuple[Enroller, Redis]) -> None:
    enroller, _ = flow
    broker = enroller.broker
    assert isinstance(broker, MemoryBrokerAdmin)
    (tok,), _ = await enroller.issue(1, 600)
    broker.fail = True
    with pytest.raises(EnrolmentUnavailable):
        await enroller.enrol(tok, "dev-a")
    assert not await enroller.store.enrolled(["dev-a"])
    broker.fail = False
    await enroller.enrol(tok, "dev-a")  # the same token works once the broker is back
    assert await enroller.store.enrolled(["dev-a", "dev-b"]) == {"dev-a"}


@pytest.mark.integration
async def test_revocation_forgets_the_device_and_probation_holds_new_ones(
    flow: tuple[Enroller, Redis],
) -> None:
    enroller, _ = flow
    fleet = enroller.fleet
    (tok,), _ = await enroller.issue(1, 600)
    password, ts = await enroller.enrol(tok, "dev-a")
    await fleet.write_telemetry([telemetry("dev-a", ts)], now=ts)
    (view,) = await fleet.views(["dev-a"], now=ts)
    assert view.cooldown_until == pytest.approx(ts + 300.0)  # not selected during probation
    await enroller.revoke("dev-a")
    assert await fleet.get("dev-a") is None and "dev-a" not in await fleet.all_ids()
    assert not await enroller.store.verify("dev-a", password)
    broker = enroller.broker
    assert isinstance(broker, MemoryBrokerAdmin) and broker.kicked == ["dev-a"]
    with pytest.raises(NotFound):
        await enroller.revoke("dev-a")
    (again,), _ = await enroller.issue(1, 600)
    await enroller.enrol(again, "dev-a")  # revoked ids may enrol again


@pytest.mark.integration
async def test_telemetry_of_ids_without_a_credential_is_refused(
    flow: tuple[Enroller, Redis],
) -> None:
    enroller, _ = flow
    (tok,), _ = await enroller.issue(1, 600)
    await enroller.enrol(tok, "dev-a")
    batcher = TelemetryBatcher(enroller.fleet, enroller.metrics, batch=10, interval_s=1.0,
                               admit=enroller.store.enrolled)  # fmt: skip
    now = time.time()
    for dev in ("dev-a", "ghost-1", "ghost-2"):
        batcher.add(telemetry(dev, now))
    assert await batcher.flush() == 1
    assert await enroller.fleet.all_ids() == ["dev-a"]
    assert counter_value(enroller.metrics.rejected, source="telemetry", reason="not_enrolled") == 2
