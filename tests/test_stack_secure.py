"""The stack's secure MQTT mode (issue 16): fleet CA + TLS, dynsec credentials, per-device
confinement, revocation — against a real Mosquitto started here (docs/security.md).

No test waits on the clock: "not delivered" is proven by ordering (the denied publish is
followed by an allowed one from the same session, or by a sentinel published after the
denied one was acknowledged, and the first message that arrives must be the allowed one).
``asyncio.wait_for`` bounds are hang guards only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import threading
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from cryptography import x509

from coordinator.broker_admin import DynsecClient
from schemas import dynsec
from schemas.dynsec import DynsecError
from schemas.mqtt_auth import MqttCredentials
from stack import pki
from stack.errors import PkiError, StackError
from stack.mqtt import Mosquitto, dynsec_plugin, mosquitto_binary, mqtt_ping
from tests.secure_broker import (
    GUARD_S,
    V5,
    code,
    coordinator,
    first_message,
    secure_mosquitto,
    session,
)

ROOT = Path(__file__).resolve().parent.parent
NOT_AUTHORIZED = (5, 135)  # CONNACK: MQTT 3.1.1 / MQTT 5 "not authorized"

needs_mosquitto = pytest.mark.skipif(
    (mosquitto_binary() is None or dynsec_plugin() is None)
    and os.environ.get("FEDFLEET_REQUIRE_REAL") != "1",
    reason="mosquitto 2 with the dynamic-security plugin is not installed",
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ dynsec: pure


@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="no mosquitto_ctrl")
def test_password_hash_is_the_one_mosquitto_ctrl_writes(tmp_path: Path) -> None:
    path = tmp_path / "ctrl.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(path), "admin", "s3cret pw"],
        check=True, capture_output=True,
    )  # fmt: skip
    theirs = json.loads(path.read_text())
    entry = theirs["clients"][0]

    again = dynsec.hash_password(
        "s3cret pw", salt=base64.b64decode(entry["salt"]), iterations=entry["iterations"]
    )
    ours = dynsec.initial_config("pw")

    assert again == {k: entry[k] for k in ("password", "salt", "iterations")}
    assert dynsec.verify_password(entry, "s3cret pw")
    assert not dynsec.verify_password(entry, "s3cret pw ")
    assert entry["iterations"] == dynsec.ITERATIONS
    assert len(base64.b64decode(entry["salt"])) == dynsec.SALT_BYTES
    assert set(ours["defaultACLAccess"]) == set(theirs["defaultACLAccess"])
    assert set(ours["clients"][0]) >= set(entry) - {"textName"}
    assert {a["acltype"] for r in theirs["roles"] for a in r["acls"]} <= set(dynsec.ACL_TYPES)


def test_initial_config_holds_only_the_coordinator_and_denies_the_rest() -> None:
    config = dynsec.initial_config("pw")

    (client,) = config["clients"]
    assert client["username"] == dynsec.COORDINATOR_USER
    assert dynsec.verify_password(client, "pw")
    assert {r["rolename"] for r in client["roles"]} == {"coordinator", "fleet-admin"}
    assert config["defaultACLAccess"] == dict.fromkeys(dynsec.DENY_ALL, False)
    topics = {a["topic"] for r in config["roles"] for a in r["acls"]}
    assert not any(t in ("#", "fleet/#") or "%" in t for t in topics)


def test_device_acls_name_only_its_own_topics() -> None:
    acls = dynsec.device_acls("dev-1")

    assert {a["topic"].split("/")[:2] == ["fleet", "dev-1"] for a in acls} == {True}
    sends = {a["topic"] for a in acls if a["acltype"] == "publishClientSend"}
    assert sends == {f"fleet/dev-1/{leaf}" for leaf in dynsec.INGEST_LEAVES}
    assert all(a["allow"] for a in acls)


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "dev+1", "dev#", "x" * 129, "dev\x00", "dév", "coordinator"]
)
def test_device_ids_that_could_widen_a_topic_are_refused(bad: str) -> None:
    with pytest.raises(DynsecError):
        dynsec.enrol_device(bad, "pw")


def test_device_id_pattern_is_the_wire_id() -> None:
    from schemas.messages import Id

    _, meta = typing.get_args(Id)
    assert (meta.pattern, meta.max_length) == (dynsec.DEVICE_ID_PATTERN, dynsec.DEVICE_ID_MAX)


def test_leaves_are_the_ones_the_services_use() -> None:
    """The ACLs name exactly the leaves the coordinator reads and writes and the agent
    publishes and subscribes to (a new leaf must be added to schemas.dynsec)."""
    from coordinator.link import INGEST_LEAVES

    coordinator_writes = {
        m
        for p in sorted((ROOT / "coordinator").rglob("*.py"))
        for m in re.findall(r'f"fleet/\{[^}]+\}/(\w+)"', p.read_text())
    }
    agent_uses = {
        m
        for p in sorted((ROOT / "edge_agent").rglob("*.py"))
        for m in re.findall(r'\.topic\("(\w+)"\)', p.read_text())
    }

    assert dynsec.INGEST_LEAVES == INGEST_LEAVES
    assert coordinator_writes == set(dynsec.DEVICE_BOUND_LEAVES)
    assert agent_uses == {*dynsec.INGEST_LEAVES, *dynsec.DEVICE_BOUND_LEAVES}


def test_responses_turn_refusals_and_garbage_into_dynsec_errors() -> None:
    ok = json.dumps({"responses": [{"command": "createClient"}]}).encode()
    refused = [{"command": "createRole", "error": "Role already exists"}]

    assert dynsec.responses(ok) == [{"command": "createClient"}]
    with pytest.raises(DynsecError, match="createRole failed: Role already exists"):
        dynsec.raise_for_errors(refused)
    for garbage in (b"", b"[]", b'{"responses": 3}', b'{"responses": [1]}'):
        with pytest.raises(DynsecError):
            dynsec.responses(garbage)


# ------------------------------------------------------------------ PKI


def test_ensure_tls_writes_owner_only_keys_and_reuses_the_ca(tmp_path: Path) -> None:
    first = pki.ensure_tls(tmp_path / "tls")
    ca_before, server_before = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    second = pki.ensure_tls(tmp_path / "tls")

    assert mode(tmp_path / "tls") == 0o700
    assert (mode(first.ca_key), mode(first.server_key)) == (0o600, 0o600)
    assert second.ca_cert.read_bytes() == ca_before
    assert second.server_cert.read_bytes() != server_before
    ca = x509.load_pem_x509_certificate(ca_before)
    leaf = x509.load_pem_x509_certificate(second.server_cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_a_ca_key_others_can_read_is_refused(tmp_path: Path) -> None:
    files = pki.ensure_tls(tmp_path)
    os.chmod(files.ca_key, 0o644)

    with pytest.raises(PkiError, match="readable by others"):
        pki.ensure_tls(tmp_path)


def test_a_ca_with_a_foreign_or_missing_key_is_refused(tmp_path: Path) -> None:
    files = pki.ensure_tls(tmp_path)
    other, _ = pki.create_ca()
    pki.write_private(files.ca_key, pki.key_pem(other))

    with pytest.raises(PkiError, match="does not belong"):
        pki.ensure_tls(tmp_path)
    files.ca_key.unlink()
    with pytest.raises(PkiError, match="only one of"):
        pki.ensure_tls(tmp_path)


async def test_the_server_certificate_serves_https_by_name(tmp_path: Path) -> None:
    """What uvicorn does with ssl_certfile/ssl_keyfile: ``load_cert_chain``; a client
    trusting only the fleet CA accepts it for ``localhost`` (the DNS SAN)."""
    files = pki.ensure_tls(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = MqttCredentials("u", "p", files.ca_cert).tls_context()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), GUARD_S) == b"ping"
        writer.close()


# ------------------------------------------------------------------ the broker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with secure_mosquitto(tmp_path_factory.mktemp("secure") / "mqtt") as server:
        yield server


async def enrol(broker: Mosquitto, *names: str) -> list[MqttCredentials]:
    """Fresh devices (unique ids per call: the broker is shared by the module)."""
    tag = uuid.uuid4().hex[:6]
    devices = [
        MqttCredentials(f"{n}-{tag}", dynsec.new_password(), coordinator(broker).cafile)
        for n in names
    ]
    async with DynsecClient(broker.host, broker.port, coordinator(broker)) as admin:
        await admin.run(*(c for d in devices for c in dynsec.enrol_device(d.username, d.password)))
    return devices


async def until_disconnected(client: aiomqtt.Client) -> aiomqtt.MqttError:
    async def run() -> aiomqtt.MqttError:
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            return exc
        raise AssertionError("message iterator ended without an error")

    return await asyncio.wait_for(run(), GUARD_S)


async def refused(broker: Mosquitto, **kw: typing.Any) -> int:
    """The CONNACK refusal code for a connection made with ``kw``."""
    with pytest.raises(MqttConnectError) as err:
        async with aiomqtt.Client(broker.host, broker.port, identifier="", timeout=GUARD_S, **kw):
            pass
    return code(err.value.rc)


@pytest.mark.integration
def test_secure_config_has_one_tls_listener_and_no_anonymous(broker: Mosquitto) -> None:
    conf = (broker.workdir / "mosquitto.conf").read_text().splitlines()
    assert broker.tls is not None

    assert [line for line in conf if line.startswith("listener")] == [
        f"listener {broker.port} 127.0.0.1"
    ]
    assert "allow_anonymous false" in conf and "allow_anonymous true" not in conf
    assert f"certfile {broker.tls.server_cert}" in conf and "tls_version tlsv1.2" in conf
    assert "require_certificate false" in conf
    assert any(line.startswith("plugin ") for line in conf)
    assert mode(broker.dynsec_file) == 0o600 and mode(broker.dynsec_file.parent) == 0o700
    assert mode(broker.tls.server_key) == 0o600


@pytest.mark.integration
async def test_anonymous_and_wrong_passwords_are_refused(broker: Mosquitto) -> None:
    (dev,) = await enrol(broker, "a")
    tls = dev.tls_context

    assert await refused(broker, tls_context=tls()) in NOT_AUTHORIZED
    assert await refused(broker, tls_context=tls(), username=dev.username,
                         password=dev.password + "x") in NOT_AUTHORIZED  # fmt: skip
    assert await refused(broker, tls_context=tls(), username="nobody",
                         password=dev.password, protocol=V5) in NOT_AUTHORIZED  # fmt: skip
    await mqtt_ping(broker.host, broker.port, credentials=dev)


@pytest.mark.integration
async def test_plain_tcp_gets_no_mqtt_session(broker: Mosquitto) -> None:
    connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # MQTT 3.1.1 CONNECT, no auth
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    writer.write(connect)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), GUARD_S)  # until the broker closes
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()

    assert not answer.startswith(b"\x20")  # no CONNACK: the listener speaks TLS only


@pytest.mark.integration
async def test_a_client_that_does_not_trust_the_fleet_ca_fails_verification(
    broker: Mosquitto,
) -> None:
    (dev,) = await enrol(broker, "a")
    system_roots = ssl.create_default_context()

    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        async with aiomqtt.Client(broker.host, broker.port, username=dev.username,
                                  password=dev.password, tls_context=system_roots,
                                  timeout=GUARD_S):  # fmt: skip
            pass


@pytest.mark.integration
async def test_a_device_publishes_on_its_own_topics_only(broker: Mosquitto) -> None:
    a, b = await enrol(broker, "a", "b")
    async with (
        session(broker, coordinator(broker)) as coord,
        session(broker, a) as dev_a,
        session(broker, b) as dev_b,
    ):
        await coord.subscribe("fleet/+/telemetry", qos=1)
        await dev_a.subscribe(f"fleet/{a.username}/#", qos=1)
        await dev_b.subscribe(f"fleet/{b.username}/#", qos=1)

        await dev_a.publish(f"fleet/{b.username}/telemetry", b"forged", qos=1)
        await dev_a.publish(f"fleet/{a.username}/task", b"self-task", qos=1)
        await dev_a.publish(f"fleet/{a.username}/telemetry", b"mine", qos=1)
        await coord.publish(f"fleet/{b.username}/task", b"sentinel", qos=1)

        assert await first_message(coord) == (f"fleet/{a.username}/telemetry", b"mine")
        assert await first_message(dev_a) == (f"fleet/{a.username}/telemetry", b"mine")
        assert await first_message(dev_b) == (f"fleet/{b.username}/task", b"sentinel")


@pytest.mark.integration
async def test_a_device_subscribes_to_its_own_topics_only(broker: Mosquitto) -> None:
    a, b = await enrol(broker, "a", "b")
    mine = (f"fleet/{a.username}/#", f"fleet/{a.username}/task", f"fleet/{a.username}/pace")
    others = (
        f"fleet/{b.username}/#", f"fleet/{b.username}/task", "fleet/#", "#",
        "fleet/+/telemetry", "fleet/+/task", f"$share/g/fleet/{a.username}/task",
        "$CONTROL/dynamic-security/#", "$SYS/#",
    )  # fmt: skip
    async with session(broker, a) as dev:
        granted = [code((await dev.subscribe(t, qos=1))[0]) for t in mine]
        denied = {t: code((await dev.subscribe(t, qos=1))[0]) for t in others}

    assert granted == [1, 1, 1]
    assert denied == dict.fromkeys(others, 0x87)  # Not authorized


@pytest.mark.integration
async def test_the_coordinator_reads_ingest_leaves_and_writes_device_leaves(
    broker: Mosquitto,
) -> None:
    """Its real subscriptions (shared ones included) are granted; fleet/# is not; a task it
    publishes reaches the device."""
    from coordinator.mqtt_link import subscriptions

    (a,) = await enrol(broker, "a")
    shared, plain = subscriptions("coord-t1"), subscriptions("")
    async with (
        session(broker, coordinator(broker)) as coord,
        session(broker, coordinator(broker)) as wide,
        session(broker, a) as dev,
    ):
        codes = [code((await coord.subscribe(f, qos=q))[0]) for f, q in shared]
        codes += [code((await wide.subscribe(f, qos=q))[0]) for f, q in plain]
        everything = code((await wide.subscribe("fleet/#", qos=1))[0])
        await dev.subscribe(f"fleet/{a.username}/#", qos=1)
        await dev.publish(f"fleet/{a.username}/update", b"delta", qos=1)
        await coord.publish(f"fleet/{a.username}/task", b"train", qos=1)

        assert codes == [q for _, q in shared + plain]
        assert everything == 0x87
        assert await first_message(coord) == (f"fleet/{a.username}/update", b"delta")
        assert await first_message(dev) == (f"fleet/{a.username}/update", b"delta")
        assert await first_message(dev) == (f"fleet/{a.username}/task", b"train")


def _paho(broker: Mosquitto, creds: MqttCredentials, **will: typing.Any) -> typing.Any:
    """A connected paho MQTT 5 client (its network loop in a thread): for what aiomqtt
    does not expose (PUBACK reason codes, DISCONNECT with will)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(creds.username, creds.password)
    client.tls_set_context(creds.tls_context())
    if will:
        client.will_set(**will)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(GUARD_S)
    return client


def _connect_with_will(broker: Mosquitto, creds: MqttCredentials, topic: str) -> None:
    """Connect with a last will on ``topic`` and leave with DISCONNECT 0x04 ("disconnect
    with will message"), so the broker publishes the will without a socket timeout."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    payload = f"will of {creds.username}".encode()
    client = _paho(broker, creds, topic=topic, payload=payload, qos=1)
    try:
        client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
    finally:
        client.loop_stop()


def _puback_codes(broker: Mosquitto, creds: MqttCredentials, topics: list[str]) -> list[int]:
    """The PUBACK reason code of a QoS 1 publish on each topic, in order."""
    codes: dict[int, int] = {}
    done = threading.Event()

    def on_publish(client: typing.Any, userdata: typing.Any, mid: int, rc: typing.Any,
                   props: typing.Any) -> None:  # fmt: skip
        codes[mid] = code(rc)
        if len(codes) == len(topics):
            done.set()

    client = _paho(broker, creds)
    client.on_publish = on_publish
    try:
        mids = [client.publish(t, b"x", qos=1).mid for t in topics]
        assert done.wait(GUARD_S)
        client.disconnect()
    finally:
        client.loop_stop()
    return [codes[m] for m in mids]


@pytest.mark.integration
async def test_a_refused_publish_is_acknowledged_not_authorized(broker: Mosquitto) -> None:
    a, b = await enrol(broker, "a", "b")
    topics = [f"fleet/{b.username}/telemetry", f"fleet/{a.username}/ack",
              f"fleet/{a.username}/telemetry"]  # fmt: skip

    got = await asyncio.to_thread(_puback_codes, broker, a, topics)

    assert got == [0x87, 0x87, 0x10]  # Not authorized x2, then "no matching subscribers"


@pytest.mark.integration
async def test_a_last_will_on_another_devices_topic_is_dropped(broker: Mosquitto) -> None:
    a, b = await enrol(broker, "a", "b")
    status = f"fleet/{a.username}/status"
    async with session(broker, coordinator(broker)) as coord:
        await coord.subscribe("fleet/+/status", qos=1)
        await asyncio.to_thread(_connect_with_will, broker, b, status)  # forged
        await asyncio.to_thread(_connect_with_will, broker, a, status)  # its own

        assert await first_message(coord) == (status, f"will of {a.username}".encode())


@pytest.mark.integration
@pytest.mark.parametrize("how", ["revoke", "disable"])
async def test_revoking_a_device_ends_its_session_and_its_access(
    broker: Mosquitto, how: str
) -> None:
    a, b = await enrol(broker, "a", "b")
    cmds = dynsec.revoke_device(a.username) if how == "revoke" else [
        dynsec.disable_client(a.username)
    ]  # fmt: skip
    async with session(broker, b) as other, session(broker, a) as dev:
        await dev.subscribe(f"fleet/{a.username}/#", qos=1)
        async with DynsecClient(broker.host, broker.port, coordinator(broker)) as admin:
            await admin.run(*cmds)
        kicked = await until_disconnected(dev)
        await other.publish(f"fleet/{b.username}/telemetry", b"still here", qos=1)

    reason = kicked.__cause__  # the DISCONNECT's reason code (MQTT 5)
    assert isinstance(reason, aiomqtt.MqttCodeError) and code(reason.rc) == 0x98  # admin action
    assert await refused(broker, tls_context=a.tls_context(), username=a.username,
                         password=a.password) in NOT_AUTHORIZED  # fmt: skip


@pytest.mark.integration
async def test_dynsec_refusals_are_typed_errors(broker: Mosquitto) -> None:
    (a,) = await enrol(broker, "a")
    async with DynsecClient(broker.host, broker.port, coordinator(broker)) as admin:
        with pytest.raises(DynsecError, match="already exists"):
            await admin.run(*dynsec.enrol_device(a.username, "another"))
        replies = await admin.call(dynsec.get_client(a.username))
    assert replies[0]["data"]["client"]["roles"] == [
        {"rolename": dynsec.device_rolename(a.username)}
    ]
    with pytest.raises(DynsecError, match="may not use"):
        async with DynsecClient(broker.host, broker.port, a):
            pass


@pytest.mark.integration
@needs_mosquitto
def test_a_restart_keeps_the_ca_the_coordinator_and_enrolled_devices(tmp_path: Path) -> None:
    first = Mosquitto(tmp_path / "mqtt", secure=True, auth="dynsec")
    first.start()
    try:
        first.wait_ready()
        (dev,) = asyncio.run(enrol(first, "a"))
    finally:
        first.stop()
    assert first.tls is not None and first.credentials is not None
    ca = first.tls.ca_cert.read_bytes()

    again = Mosquitto(tmp_path / "mqtt", secure=True, auth="dynsec")
    again.start()
    try:
        again.wait_ready()
        asyncio.run(mqtt_ping(again.host, again.port, credentials=dev))
    finally:
        again.stop()
    assert again.credentials == first.credentials
    assert mode(again.dynsec_file) == 0o600  # as the plugin rewrote it after the enrolment
    assert again.credentials is not None
    assert again.credentials.password not in repr(again.credentials)
    assert dev.password not in repr(dev)
    assert again.tls is not None and again.tls.ca_cert.read_bytes() == ca


@needs_mosquitto
def test_a_coordinator_secret_without_its_store_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt" / "dynsec" / "coordinator.secret"
    secret.parent.mkdir(parents=True)
    secret.write_text("orphan")
    server = Mosquitto(tmp_path / "mqtt", secure=True, auth="dynsec")

    with pytest.raises(StackError, match="only one of"):
        server.start()
    assert server.proc is None


@pytest.mark.integration
@needs_mosquitto
def test_the_default_mode_is_still_plain_and_anonymous(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "mqtt")
    server.start()
    try:
        server.wait_ready()
        asyncio.run(mqtt_ping(server.host, server.port))
    finally:
        server.stop()
    conf = (tmp_path / "mqtt" / "mosquitto.conf").read_text().splitlines()
    assert conf[:2] == [f"listener {server.port} 127.0.0.1", "allow_anonymous true"]
    assert server.credentials is None and server.tls is None
    assert not any(line.startswith(("plugin", "certfile")) for line in conf)


@pytest.mark.integration
@needs_mosquitto
def test_a_coordinator_secret_the_broker_refuses_fails_the_start_at_once(
    tmp_path: Path,
) -> None:
    first = Mosquitto(tmp_path / "mqtt", secure=True, auth="dynsec")
    first.start()
    first.stop()
    pki.write_private(first.dynsec_file.parent / "coordinator.secret", b"not the one")

    again = Mosquitto(tmp_path / "mqtt", secure=True, auth="dynsec")
    again.start()
    try:
        with pytest.raises(StackError, match="refused coordinator's credentials"):
            again.wait_ready()
    finally:
        again.stop()


# ------------------------------------------------------------------ Redis with a password


def test_secure_redis_refuses_clients_without_its_password(tmp_path: Path) -> None:
    import redis as redis_sync

    from stack.launcher import StackInfo, redacted
    from stack.redis import RedisServer, redis_binary

    if redis_binary() is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("FEDFLEET_REQUIRE_REAL=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis", password=True)
    server.start()
    try:
        server.wait_ready()
        assert server.password and server.password in server.url
        assert mode(tmp_path / "redis" / "redis.secret") == 0o600
        assert mode(tmp_path / "redis" / "redis.conf") == 0o600
        assert server.password not in " ".join(server.proc.argv)  # type: ignore[union-attr]
        anon = redis_sync.Redis(host="127.0.0.1", port=server.port, socket_timeout=GUARD_S)
        with pytest.raises(redis_sync.exceptions.AuthenticationError):
            anon.ping()
        wrong = redis_sync.Redis(host="127.0.0.1", port=server.port, password="nope",
                                 socket_timeout=GUARD_S)  # fmt: skip
        with pytest.raises(redis_sync.exceptions.AuthenticationError):
            wrong.ping()
        coord = redis_sync.Redis.from_url(server.url, socket_timeout=GUARD_S)
        assert coord.ping()
        # ACL users: the coordinator runs data commands and scripts, not administration
        assert coord.eval("return redis.call('set', KEYS[1], ARGV[1])", 1, "ff:k", "v") == b"OK"
        for cmd in (("FLUSHALL",), ("CONFIG", "GET", "dir"), ("KEYS", "*"),
                    ("ACL", "LIST"), ("SHUTDOWN",)):  # fmt: skip
            with pytest.raises(redis_sync.exceptions.NoPermissionError):
                coord.execute_command(*cmd)  # type: ignore[no-untyped-call]
        admin = redis_sync.Redis.from_url(server.admin_url, socket_timeout=GUARD_S)
        assert mode(tmp_path / "redis" / "redis-admin.secret") == 0o600
        acl = [str(line) for line in admin.acl_list()]
        assert not any("nopass" in line for line in acl), acl  # every user needs a password
        conf = (tmp_path / "redis" / "redis.conf").read_text()
        assert server.password not in conf and server.admin_password not in conf  # hashes only
        assert admin.get("ff:k") == b"v"
        # a kill -9 loses no transaction: Redis 7.0 replays the append-only file's MULTI/EXEC
        # blocks as the default user, and with "user default off" one holding a script was
        # refused (NOPERM) and its writes lost; the default user keeps every permission
        admin.config_set("appendfsync", "always")
        script = coord.register_script("return redis.call('incr', KEYS[1])")
        script(keys=["ff:n0"])  # loaded: inside MULTI it goes as EVALSHA
        tx = coord.pipeline(transaction=True)
        tx.set("ff:tx", "1")
        script(keys=["ff:n"], client=tx)  # the trigger: a script inside MULTI/EXEC
        tx.execute()
        assert server.proc is not None and server.proc.proc is not None
        server.proc.proc.kill()
        server.proc.proc.wait(GUARD_S)
        server.start()
        server.wait_ready()
        again = redis_sync.Redis.from_url(server.url, socket_timeout=GUARD_S)
        assert again.get("ff:tx") == b"1" and again.get("ff:n") == b"1"
        assert "NOPERM" not in (tmp_path / "redis" / "redis.log").read_text()
        info = StackInfo(kafka_bootstrap="k:1", mqtt_host="h", mqtt_port=1, redis_url=server.url,
                         kafka_impl="k", mqtt_impl="m", redis_impl="r")  # fmt: skip
        assert server.password not in str(info.describe())
        assert server.password not in " ".join(info.coordinator_args())
        assert info.coordinator_env() == {"FEDFLEET_REDIS_URL": server.url}
        assert redacted("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"
    finally:
        server.stop()
