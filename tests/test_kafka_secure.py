"""The secure stack's Kafka (``stack.kafka_secure``): SASL_SSL on every listener, one
SCRAM user per service, the fleet CA; and the services' ``kafka_*`` settings."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from aggregator.settings import AggregatorSettings
from coordinator.settings import CoordinatorSettings
from schemas.errors import SettingsError
from schemas.kafka_auth import KafkaAuth, client_kwargs
from stack import envfile
from stack.errors import StackError
from stack.kafka import ApacheKafka, kafka_brokers
from stack.kafka_secure import USERS
from stack.launcher import StackInfo, env_require_real
from stack.pki import ensure_ca, ensure_tls

GUARD_S = 10.0  # a refused client gives up after this (it would retry forever)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    d = tmp_path_factory.mktemp("secure-kafka")
    ensure_ca(d / "ca")
    try:
        k = ApacheKafka(d / "kafka", ca_dir=d / "ca", heap_mb=384)
    except StackError as exc:
        if env_require_real():
            raise
        pytest.skip(str(exc))
    k.start()
    try:
        k.wait_ready(120)
        yield k
    finally:
        k.stop()


async def _connects(bootstrap: str, **kw: object) -> bool:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=4000, **kw)
    try:
        await asyncio.wait_for(p.start(), GUARD_S)
        return True
    except (KafkaError, TimeoutError, OSError):
        return False
    finally:
        await p.stop()


@pytest.mark.integration
async def test_every_listener_refuses_plain_text_and_wrong_logins(kafka: ApacheKafka) -> None:
    sec = kafka.security
    assert sec is not None
    good = kafka.auth("coordinator")
    assert good is not None
    assert await _connects(kafka.bootstrap, **good.client_kwargs())
    assert not await _connects(kafka.bootstrap)  # PLAINTEXT
    ssl_only = {"security_protocol": "SSL", "ssl_context": good.tls_context()}
    assert not await _connects(kafka.bootstrap, **ssl_only)  # TLS without a login
    wrong = KafkaAuth("coordinator", "not-the-password", sec.cafile)
    assert not await _connects(kafka.bootstrap, **wrong.client_kwargs())
    stranger = KafkaAuth("mallory", good.password, sec.cafile)
    assert not await _connects(kafka.bootstrap, **stranger.client_kwargs())
    # the controller listener (KIP-919 admin clients bootstrap from it) is SASL_SSL too
    controller = f"127.0.0.1:{kafka.ports[0][1]}"
    assert not await _connects(controller)
    assert not await _connects(controller, **good.client_kwargs())  # PLAIN there, broker only


@pytest.mark.integration
async def test_a_client_that_does_not_trust_the_fleet_ca_fails(
    kafka: ApacheKafka, tmp_path: Path
) -> None:
    other = ensure_tls(tmp_path / "other")  # another CA
    good = kafka.auth("aggregator")
    assert good is not None
    foreign = KafkaAuth("aggregator", good.password, other.ca_cert)
    assert not await _connects(kafka.bootstrap, **foreign.client_kwargs())


@pytest.mark.integration
async def test_each_service_user_writes_and_reads(kafka: ApacheKafka) -> None:
    topic = f"t{os.getpid()}-secure"
    prod = AIOKafkaProducer(**client_kwargs(kafka.auth("coordinator")),
                            bootstrap_servers=kafka.bootstrap, acks="all",
                            enable_idempotence=True)  # fmt: skip
    await prod.start()
    try:
        await prod.send_and_wait(topic, b"from-the-coordinator", partition=0)
    finally:
        await prod.stop()
    cons = AIOKafkaConsumer(**client_kwargs(kafka.auth("aggregator")),
                            bootstrap_servers=kafka.bootstrap, group_id=None,
                            enable_auto_commit=False)  # fmt: skip
    await cons.start()
    try:
        tp = TopicPartition(topic, 0)
        cons.assign([tp])
        await cons.seek_to_beginning(tp)
        got = await asyncio.wait_for(cons.getone(), GUARD_S)
        assert got.value == b"from-the-coordinator"
    finally:
        await cons.stop()
    assert await kafka_brokers(kafka.bootstrap, auth=kafka.auth("fedfleet-admin")) == 1


@pytest.mark.integration
def test_secrets_are_owner_only_and_no_password_is_in_a_command_line(
    kafka: ApacheKafka,
) -> None:
    sec = kafka.security
    assert sec is not None
    assert mode(sec.secrets_dir) == 0o700
    for user in USERS:
        assert mode(sec.password_file(user)) == 0o600
    assert mode(sec.keystore) == 0o600
    props = kafka.workdir / "kafka-1" / "server.properties"
    assert mode(props) == 0o600  # it holds the brokers' JAAS password
    argv = " ".join(" ".join(p.argv) for p in kafka.procs) + " ".join(sec.format_args())
    for pw in sec.passwords.values():
        assert pw not in argv  # --add-scram carries only salted hashes


def test_kafka_settings_go_together_and_refuse_readable_secrets(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"")
    with pytest.raises(SettingsError, match="go together"):
        CoordinatorSettings(kafka_username="coordinator")
    with pytest.raises(SettingsError, match="kafka_cafile"):
        CoordinatorSettings(kafka_username="c", kafka_password_file=tmp_path / "pw")
    with pytest.raises(SettingsError, match="kafka_sasl_mechanism"):
        CoordinatorSettings(kafka_sasl_mechanism="GSSAPI")
    with pytest.raises(SettingsError):  # the aggregator's ConfigError is a SettingsError
        AggregatorSettings(kafka_username="aggregator")
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    os.chmod(pw, 0o644)
    s = CoordinatorSettings(kafka_username="c", kafka_password_file=pw, kafka_cafile=ca)
    with pytest.raises(SettingsError, match="readable by group or others"):
        s.kafka_kwargs()
    os.chmod(pw, 0o600)
    assert CoordinatorSettings().kafka_kwargs() == {"bootstrap_servers": "127.0.0.1:9092"}


def test_the_services_get_their_own_logins_from_the_stack(tmp_path: Path) -> None:
    tls = ensure_tls(tmp_path / "tls")
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for user in USERS:
        f = secrets / f"{user}.secret"
        f.write_text(f"pw-{user}")
        os.chmod(f, 0o600)
    info = StackInfo(kafka_bootstrap="127.0.0.1:1", mqtt_host="h", mqtt_port=1,
                     redis_url="redis://127.0.0.1:1/0", kafka_impl="apache-kafka",
                     mqtt_impl="m", redis_impl="r", kafka_cafile=str(tls.ca_cert),
                     kafka_secrets_dir=str(secrets))  # fmt: skip
    assert "SASL_SSL" in info.describe()["kafka"]
    args = info.coordinator_args()
    assert args[args.index("--kafka-username") + 1] == "coordinator"
    assert "pw-coordinator" not in " ".join(args + info.aggregator_args())
    assert info.aggregator_args()[-6:] == [
        "--kafka-username", "aggregator", "--kafka-password-file",
        str(secrets / "aggregator.secret"), "--kafka-cafile", str(tls.ca_cert),
    ]  # fmt: skip
    env = envfile.service_env(envfile.StackFile(info=info))
    assert env["FEDFLEET_KAFKA_USERNAME"] == "coordinator"
    assert env["FEDFLEET_AGG_KAFKA_USERNAME"] == "aggregator"
    assert env["FEDFLEET_AGG_KAFKA_PASSWORD_FILE"] == str(secrets / "aggregator.secret")
    kw = info.kafka_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_plain_username"] == "fedfleet-admin"
    assert kw["sasl_plain_password"] == "pw-fedfleet-admin"
    s = CoordinatorSettings.from_env({k: v for k, v in env.items()
                                      if k.startswith("FEDFLEET_KAFKA_")})  # fmt: skip
    assert s.kafka_kwargs()["sasl_plain_password"] == "pw-coordinator"
    assert "pw-coordinator" not in repr(s.kafka_login())
