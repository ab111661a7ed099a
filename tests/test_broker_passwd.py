"""The secure broker's default credential store: Mosquitto's password file + ``%u`` ACL file
(``schemas.passwd``), managed by ``coordinator.broker_passwd.PasswdBrokerAdmin`` (batched
rewrite + SIGHUP + probe) — against a real Mosquitto started here (docs/security.md).

"Not delivered" is proven by ordering, as in tests/test_stack_secure.py: a sentinel
published after the refused message must be the first to arrive. ``wait_for`` bounds are
hang guards only.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio
from aiomqtt.exceptions import MqttConnectError

from coordinator.broker_passwd import PasswdBrokerAdmin
from schemas import dynsec, passwd
from schemas.dynsec import DynsecError
from schemas.mqtt_auth import MqttCredentials
from stack.mqtt import Mosquitto, mosquitto_binary
from tests.secure_broker import (
    GUARD_S,
    code,
    coordinator,
    first_message,
    secure_mosquitto,
    session,
)

NOT_AUTHORIZED = (5, 134, 135)
needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None and os.environ.get("FEDFLEET_REQUIRE_REAL") != "1",
    reason="mosquitto is not installed",
)


# ------------------------------------------------------------------ pure


@pytest.mark.skipif(mosquitto_binary() is None, reason="no mosquitto_passwd")
def test_hash_is_the_one_mosquitto_passwd_writes(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "dev-1", "s3cret"], check=True)
    entries = passwd.parse(f.read_text())
    assert passwd.verify(entries["dev-1"], "s3cret")
    assert not passwd.verify(entries["dev-1"], "other")
    ours = passwd.hash_field("s3cret")
    assert ours.startswith(f"$7${dynsec.ITERATIONS}$") and passwd.verify(ours, "s3cret")


def test_parse_render_apply() -> None:
    entries = passwd.parse(passwd.initial("coord-pw", "probe-pw").decode())
    assert list(entries) == [dynsec.COORDINATOR_USER, passwd.PROBE_USER]
    passwd.apply(entries, [("dev-1", passwd.hash_field("a")), ("dev-2", passwd.hash_field("b")),
                           ("dev-1", None)])  # fmt: skip
    assert list(entries) == [dynsec.COORDINATOR_USER, passwd.PROBE_USER, "dev-2"]
    assert passwd.parse(passwd.render(entries).decode()) == entries
    for reserved in (dynsec.COORDINATOR_USER, passwd.PROBE_USER, "a/b", "fleet/#", ""):
        with pytest.raises(DynsecError):
            passwd.apply(entries, [(reserved, None)])


@pytest.mark.parametrize("text", ["nocolon\n", "u:plain\n", "u:$7$101$!!$abc\n",
                                  "u:$7$101$YWJj$YWJj\nu:$7$101$YWJj$YWJj\n"])  # fmt: skip
def test_a_file_mosquitto_would_refuse_is_a_typed_error(text: str) -> None:
    with pytest.raises(passwd.PasswdError):
        passwd.parse(text)


def test_the_acl_confines_devices_by_username() -> None:
    lines = passwd.acl_text().splitlines()
    assert f"user {dynsec.COORDINATOR_USER}" in lines
    assert "pattern read fleet/%u/#" in lines
    assert {ln.split()[-1] for ln in lines if ln.startswith("pattern write")} == {
        f"fleet/%u/{leaf}" for leaf in dynsec.INGEST_LEAVES
    }
    assert not any("#" in ln.split()[-1] for ln in lines if ln.startswith("topic write"))


# ------------------------------------------------------------------ on a real broker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with secure_mosquitto(tmp_path_factory.mktemp("passwd") / "mqtt", auth="passwd") as srv:
        yield srv


@pytest_asyncio.fixture
async def admin(broker: Mosquitto) -> AsyncIterator[PasswdBrokerAdmin]:
    assert broker.credentials is not None
    async with PasswdBrokerAdmin(broker.passwd_file, broker.pid_file, broker.host,
                                 broker.port, broker.credentials.cafile) as adm:  # fmt: skip
        yield adm


async def enrol(admin: PasswdBrokerAdmin, broker: Mosquitto, *names: str) -> list[MqttCredentials]:
    tag = uuid.uuid4().hex[:6]
    devs = [MqttCredentials(f"{n}-{tag}", dynsec.new_password(), coordinator(broker).cafile)
            for n in names]  # fmt: skip
    await asyncio.gather(*(admin.enrol(d.username, d.password) for d in devs))
    return devs


async def refused(broker: Mosquitto, creds: MqttCredentials | None) -> int:
    kw = creds.client_kwargs() if creds else {"tls_context": coordinator(broker).tls_context()}
    with pytest.raises(MqttConnectError) as err:
        async with aiomqtt.Client(broker.host, broker.port, identifier="", timeout=GUARD_S, **kw):
            pass
    return code(err.value.rc)


@pytest.mark.integration
@needs_mosquitto
def test_config_uses_the_password_file_and_owner_only_files(broker: Mosquitto) -> None:
    conf = (broker.workdir / "mosquitto.conf").read_text().splitlines()
    assert f"password_file {broker.passwd_file}" in conf and f"acl_file {broker.acl_file}" in conf
    assert "allow_anonymous false" in conf and not any(ln.startswith("plugin") for ln in conf)
    assert stat.S_IMODE(broker.passwd_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.passwd_file.parent.stat().st_mode) == 0o700
    assert broker.proc is not None and broker.pid_file.read_text().strip() == str(broker.proc.pid)


@pytest.mark.integration
@needs_mosquitto
async def test_anonymous_unknown_and_wrong_passwords_are_refused(
    broker: Mosquitto, admin: PasswdBrokerAdmin
) -> None:
    (a,) = await enrol(admin, broker, "a")
    assert await refused(broker, None) in NOT_AUTHORIZED
    assert await refused(broker, MqttCredentials(a.username, "wrong", a.cafile)) in NOT_AUTHORIZED
    assert await refused(broker, MqttCredentials("ghost", "x", a.cafile)) in NOT_AUTHORIZED
    probe = MqttCredentials(passwd.PROBE_USER, "guess", a.cafile)
    assert await refused(broker, probe) in NOT_AUTHORIZED
    async with session(broker, a):
        pass


@pytest.mark.integration
@needs_mosquitto
async def test_a_device_publishes_and_receives_on_its_own_topics_only(
    broker: Mosquitto, admin: PasswdBrokerAdmin
) -> None:
    a, b = await enrol(admin, broker, "a", "b")
    async with (
        session(broker, coordinator(broker)) as coord,
        session(broker, a) as dev_a,
        session(broker, b) as dev_b,
    ):
        await coord.subscribe("$share/g/fleet/+/telemetry", qos=1)
        # the ACL file grants every SUBSCRIBE; what matters is what is delivered
        for wide in ("fleet/#", f"fleet/{b.username}/#", "#"):
            await dev_a.subscribe(wide, qos=1)
        await dev_b.subscribe(f"fleet/{b.username}/#", qos=1)

        await dev_a.publish(f"fleet/{b.username}/telemetry", b"forged", qos=1)
        await dev_a.publish(f"fleet/{a.username}/task", b"self-task", qos=1)
        await coord.publish(f"fleet/{b.username}/task", b"for b", qos=1)
        await dev_b.publish(f"fleet/{b.username}/telemetry", b"b's own", qos=1)
        await dev_a.publish(f"fleet/{a.username}/telemetry", b"mine", qos=1)

        assert await first_message(dev_b) == (f"fleet/{b.username}/task", b"for b")
        assert await first_message(coord) == (f"fleet/{b.username}/telemetry", b"b's own")
        assert await first_message(coord) == (f"fleet/{a.username}/telemetry", b"mine")
        # a saw neither b's task nor b's telemetry, nor the task it forged for itself
        assert await first_message(dev_a) == (f"fleet/{a.username}/telemetry", b"mine")


@pytest.mark.integration
@needs_mosquitto
async def test_revocation_cuts_the_session_and_refuses_the_next_connect(
    broker: Mosquitto, admin: PasswdBrokerAdmin
) -> None:
    a, b = await enrol(admin, broker, "a", "b")
    async with session(broker, b) as other, session(broker, a) as dev:
        await dev.subscribe(f"fleet/{a.username}/#", qos=1)
        await admin.revoke(a.username)  # returns once the broker runs the new file
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(first_message(dev), GUARD_S)
        await other.publish(f"fleet/{b.username}/telemetry", b"still here", qos=1)
    assert await refused(broker, a) in NOT_AUTHORIZED
    assert not await admin.has_client(a.username) and await admin.has_client(b.username)


@pytest.mark.integration
@needs_mosquitto
async def test_a_new_credential_cuts_the_old_ones_session(
    broker: Mosquitto, admin: PasswdBrokerAdmin
) -> None:
    (a,) = await enrol(admin, broker, "a")
    async with session(broker, a) as dev:
        await dev.subscribe(f"fleet/{a.username}/#", qos=1)
        await admin.enrol(a.username, "the-new-secret")
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(first_message(dev), GUARD_S)
    assert await refused(broker, a) in NOT_AUTHORIZED
    async with session(broker, MqttCredentials(a.username, "the-new-secret", a.cafile)):
        pass


@pytest.mark.integration
@needs_mosquitto
async def test_concurrent_enrolments_share_reloads_and_two_coordinators_lose_nothing(
    broker: Mosquitto, admin: PasswdBrokerAdmin
) -> None:
    assert broker.credentials is not None
    other = PasswdBrokerAdmin(broker.passwd_file, broker.pid_file, broker.host, broker.port,
                              broker.credentials.cafile)  # fmt: skip
    before = admin.batches
    try:
        tag = uuid.uuid4().hex[:6]
        ids = [f"c{i}-{tag}" for i in range(60)]
        await asyncio.gather(*(
            (admin if i % 2 else other).enrol(d, f"pw-{d}") for i, d in enumerate(ids)
        ))  # fmt: skip
    finally:
        await other.close()
    assert admin.batches - before < 30  # batched, not one reload per device
    entries = passwd.parse(broker.passwd_file.read_text())
    assert all(passwd.verify(entries[d], f"pw-{d}") for d in ids)
    for d in (ids[0], ids[-1]):
        async with session(broker, MqttCredentials(d, f"pw-{d}", broker.credentials.cafile)):
            pass


@pytest.mark.integration
@needs_mosquitto
async def test_a_broker_that_is_gone_is_a_dynsec_error(tmp_path: Path) -> None:
    pw, pid = tmp_path / "passwd", tmp_path / "pid"
    pw.write_bytes(passwd.initial("c", "p"))
    pid.write_text("999999999\n")
    async with PasswdBrokerAdmin(pw, pid, "127.0.0.1", 9, timeout=1.0) as adm:
        with pytest.raises(DynsecError, match="cannot signal"):
            await adm.enrol("dev-1", "pw")
        pid.unlink()
        with pytest.raises(DynsecError, match="cannot update"):
            await adm.revoke("dev-1")
        with pytest.raises(DynsecError):
            await adm.enrol("coordinator", "pw")


@pytest.mark.integration
@needs_mosquitto
def test_a_restart_keeps_enrolled_devices(tmp_path: Path) -> None:
    first = Mosquitto(tmp_path / "mqtt", secure=True)
    first.start()
    try:
        first.wait_ready()
        assert first.credentials is not None

        async def go() -> MqttCredentials:
            assert first.credentials is not None
            async with PasswdBrokerAdmin(first.passwd_file, first.pid_file, first.host,
                                         first.port, first.credentials.cafile) as adm:  # fmt: skip
                (dev,) = await enrol(adm, first, "a")
            return dev

        dev = asyncio.run(go())
    finally:
        first.stop()
    again = Mosquitto(tmp_path / "mqtt", secure=True)
    again.start()
    try:
        again.wait_ready()
        assert again.credentials == first.credentials

        async def connect() -> None:
            async with session(again, dev):
                pass

        asyncio.run(connect())
    finally:
        again.stop()
