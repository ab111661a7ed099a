"""Typed settings for the coordinator, built from the environment in one place.

Every field can be set with ``FEDFLEET_<FIELD>`` (upper case), e.g.
``FEDFLEET_KAFKA_BOOTSTRAP=127.0.0.1:9092``. Build with :meth:`CoordinatorSettings.from_env`
or construct directly (keyword-only) in tests.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import kafka_auth, settings, topics
from schemas.brokers import Broker, parse_brokers
from schemas.errors import SettingsError
from schemas.mqtt_auth import MqttCredentials
from schemas.settings import check, parse_mqtt_url

# what coordinator.redis_client opens (redis+cluster://host:port: a Redis Cluster)
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True, kw_only=True, slots=True)
class CoordinatorSettings:
    """Everything the coordinator needs; no module reads the environment itself."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    # several brokers (host:port each, comma-separated in FEDFLEET_MQTT_BROKERS): devices
    # are spread over them by a hash of their id (schemas.brokers); the coordinator ingests
    # from every one and publishes to a device on the broker it was last heard on.
    # Empty: the one broker mqtt_host:mqtt_port. Broker 0 is the one the admin store uses
    mqtt_brokers: tuple[str, ...] = ()
    redis_url: str = "redis://127.0.0.1:6379/0"  # redis+cluster://host:port: a Redis Cluster
    http_host: str = "127.0.0.1"
    http_port: int = 8000  # what agents default to (api_url); 0 = pick a free port
    topic_prefix: str = "fl."
    redis_prefix: str = ""  # "" = "ff:" + topic_prefix (isolates deployments by topic prefix)
    mqtt_share_group: str = ""  # "" = "coord" (default prefix) or "coord-<topic_prefix>"
    # the deployment's MQTT namespace, <root>/<device>/<leaf> (schemas.topics): two
    # deployments sharing a broker give each its own; told to devices at enrolment
    mqtt_topic_root: str = "fleet"
    client_id: str = field(default_factory=lambda: f"coord-{secrets.token_hex(4)}")
    model_store_dir: Path = Path("var/models")
    signing_key_path: Path = Path("var/keys/model-signing.ed25519")
    task_key_path: Path = Path("var/keys/task-token.key")  # upload-token HMAC key, shared
    admin_token: str = "change-me"
    # selection / leases
    selection_tick_s: float = 1.0
    lease_s: float = 120.0
    # how long a task's record stays in Redis after it was issued (a late resend of its
    # upload is still answered duplicate); most of Redis's bytes in a big fleet
    task_record_ttl_s: float = 7 * 86400.0
    telemetry_ttl_s: float = 60.0
    pace_retry_s: float = 30.0
    pace_enabled: bool = True
    pace_max_per_tick: int = 2000  # bound the Pace burst of one selection pass
    pace_per_pass: int = 200  # waiting devices read per job and pass for pacing
    candidate_factor: int = 4  # eligible devices read per free slot (network stratification)
    # partitions the coordinator creates when the topics are missing
    task_partitions: int = 1
    max_shards: int = 8
    # the aggregators' consumer group (AggregatorSettings.group_id): a job that names no
    # ``shards`` gets one per live member, at most max_shards
    aggregator_group: str = "fl-aggregators"
    max_params: int = 64 << 20  # largest model a job may have (parameters; 256 MiB float32)
    # telemetry batching
    telemetry_batch: int = 500
    telemetry_flush_s: float = 0.05
    # telemetry whose ts is further than this ahead of / behind the coordinator's clock is
    # refused (clock_skew): a device clock five minutes fast, or a report a day old, is not
    # a reading of now
    telemetry_max_ahead_s: float = 300.0
    telemetry_max_behind_s: float = 86400.0
    # a device not heard from for device_ttl_s leaves the fleet view (every index, its
    # detail and history; see FleetStore.sweep), checked every device_sweep_s. One day: a
    # device that comes back after that starts a new UTC day anyway (daily_cap) and its
    # record is kept longer while it holds a task, a cooldown or today's task count
    device_ttl_s: float = 86400.0
    device_sweep_s: float = 60.0
    # per-device rate limits (token buckets in each coordinator; 0 = no limit). Telemetry
    # and status: the fastest fleet we run reports every 0.5 s (loadtest scale), agents
    # every 10 s. Uploads, task answers and reports: a device answers each task with 1-3
    # messages and resends an un-acked update every resend_interval_s (>= 10 s)
    telemetry_rate_per_s: float = 5.0
    telemetry_burst: int = 20
    upload_rate_per_s: float = 10.0
    upload_burst: int = 50
    upload_concurrency: int = 64  # uploads handled at once (each waits for Kafka acks)
    # registry
    retention: int = 20
    # recovery: how often Redis is checked for jobs it lost (restart without its data,
    # restored from an older snapshot); they are restored from the job journal
    recovery_check_s: float = 2.0
    # task aborts: a device whose data cannot train a job (reason data_*) is held off that
    # job this long; a job with no accepted update and this many aborts for one data
    # reason fails with that reason
    data_hold_s: float = 600.0
    fail_after_aborts: int = 20
    # a standardize job's statistics phase ends once this many devices reported (or every
    # device there was to ask), or stats_timeout_s after it opened with at least one report
    stats_min_reports: int = 100  # enough devices for fleet-wide mean/std (non-IID)
    stats_timeout_s: float = 120.0
    # a completed job's final evaluation closes early, once no task of it is out and no
    # eligible device is left to ask, but not before this long (in-flight training tasks
    # free their devices first); at the latest at the job's evaluation.timeout_s
    final_grace_s: float = 15.0
    # POST /v1/artifacts: the largest ONNX file taken (the parameter cap is max_params)
    max_artifact_bytes: int = 256 << 20
    # secure mode (docs/security.md). The broker: TLS verified against mqtt_cafile, as
    # mqtt_username with the password in mqtt_password_file (owner-only); the coordinator
    # then enrols and revokes devices in the broker's credential store: its password file
    # (mqtt_passwd_file, reloaded by a SIGHUP to the pid in mqtt_broker_pidfile; both or
    # neither) or else its dynamic-security plugin (over MQTT)
    mqtt_username: str = ""  # "" = anonymous (insecure broker)
    mqtt_password_file: Path | None = None
    mqtt_cafile: Path | None = None  # set: TLS to the broker (never falls back to plain TCP)
    mqtt_passwd_file: Path | None = None
    mqtt_broker_pidfile: Path | None = None  # one pid per line: every broker sharing the file
    # telemetry and status from an id without a valid credential are refused (not_enrolled),
    # and HTTP uploads need the device's credential (Basic auth)
    require_enrolment: bool = False
    enrol_token_ttl_s: float = 86400.0  # default lifetime of an enrolment token
    enrol_token_max_ttl_s: float = 30 * 86400.0
    probation_s: float = 0.0  # a newly enrolled device is not selected for this long
    # the broker address enrolled devices are told ("" = this coordinator's mqtt_host and
    # mqtt_port, with TLS iff mqtt_cafile is set)
    device_mqtt_url: str = ""
    # several brokers: the addresses enrolled devices are told, one per mqtt_brokers entry
    # in the same order (mqtt[s]://host:port; empty: the mqtt_brokers, TLS iff mqtt_cafile)
    device_mqtt_urls: tuple[str, ...] = ()
    # fleet-status reads (GET /v1/fleet, /v1/devices, /v1/devices/{id}) need the admin token
    # or operator_token, a read-only token for dashboards and on-call (never logged)
    fleet_reads_need_token: bool = False
    operator_token: str = ""
    # REST over HTTPS (TLS 1.2+) with this certificate chain and key (both or neither);
    # the secure stack passes the broker's server certificate from the fleet CA
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Kafka over SASL_SSL (the secure stack): TLS verified against kafka_cafile, a SCRAM
    # login as kafka_username with the password in kafka_password_file (owner-only)
    kafka_username: str = ""  # "" = plain text, no login
    kafka_password_file: Path | None = None
    kafka_cafile: Path | None = None
    kafka_sasl_mechanism: str = kafka_auth.DEFAULT_MECHANISM

    def __post_init__(self) -> None:
        for name in ("kafka_bootstrap", "mqtt_host", "redis_url", "http_host", "topic_prefix",
                     "aggregator_group"):
            check(bool(str(getattr(self, name)).strip()), name, "must not be empty")
        check(1 <= self.mqtt_port <= 65535, "mqtt_port", f"{self.mqtt_port} is not in 1..65535")
        topics.check_root(self.mqtt_topic_root)
        check(not self.device_mqtt_urls or len(self.device_mqtt_urls) == len(self.brokers),
              "device_mqtt_urls", f"{len(self.device_mqtt_urls)} device broker URLs for "
              f"{len(self.brokers)} brokers: one per mqtt_brokers entry")  # fmt: skip
        check(0 <= self.http_port <= 65535, "http_port",
              f"{self.http_port} is not in 0..65535 (0 picks a free port)")  # fmt: skip
        check(self.redis_url.startswith(REDIS_URL_SCHEMES), "redis_url",
              f"{self.redis_url!r} is not a redis:// (or redis+cluster://) URL")  # fmt: skip
        for name in ("selection_tick_s", "lease_s", "telemetry_ttl_s", "pace_retry_s",
                     "telemetry_flush_s", "recovery_check_s", "data_hold_s",
                     "stats_timeout_s", "final_grace_s", "telemetry_max_ahead_s",
                     "telemetry_max_behind_s", "device_ttl_s", "device_sweep_s",
                     "enrol_token_max_ttl_s"):  # fmt: skip
            v = getattr(self, name)
            check(v > 0, name, f"must be > 0, got {v}")
        check(self.task_record_ttl_s > self.lease_s, "task_record_ttl_s",
              f"must be > lease_s ({self.lease_s}), got {self.task_record_ttl_s}")  # fmt: skip
        check(self.device_ttl_s > self.telemetry_ttl_s, "device_ttl_s",
              f"must be > telemetry_ttl_s ({self.telemetry_ttl_s}), got {self.device_ttl_s}")
        for name in ("telemetry_rate_per_s", "upload_rate_per_s"):
            v = getattr(self, name)
            check(v >= 0, name, f"must be >= 0 (0: no limit), got {v}")
        for name in ("pace_max_per_tick", "pace_per_pass", "candidate_factor",
                     "task_partitions", "max_shards", "max_params", "telemetry_batch",
                     "upload_concurrency", "retention", "fail_after_aborts",
                     "stats_min_reports", "max_artifact_bytes", "telemetry_burst",
                     "upload_burst"):  # fmt: skip
            v = getattr(self, name)
            check(v >= 1, name, f"must be >= 1, got {v}")
        check(bool(self.admin_token), "admin_token", "must not be empty")
        check(self.probation_s >= 0, "probation_s", f"must be >= 0, got {self.probation_s}")
        check(0 < self.enrol_token_ttl_s <= self.enrol_token_max_ttl_s, "enrol_token_ttl_s",
              f"must be in (0, enrol_token_max_ttl_s={self.enrol_token_max_ttl_s}]")  # fmt: skip
        check(bool(self.mqtt_username) == (self.mqtt_password_file is not None),
              "mqtt_password_file", "mqtt_username and mqtt_password_file go together")  # fmt: skip
        check((self.tls_certfile is None) == (self.tls_keyfile is None), "tls_keyfile",
              "tls_certfile and tls_keyfile go together")  # fmt: skip
        check(not self.mqtt_username or self.mqtt_cafile is not None, "mqtt_cafile",
              "a broker password is only sent over TLS: set mqtt_cafile")  # fmt: skip
        kafka_auth.check_kafka_auth(self.kafka_username, self.kafka_password_file,
                                    self.kafka_cafile, self.kafka_sasl_mechanism)  # fmt: skip
        check((self.mqtt_passwd_file is None) == (self.mqtt_broker_pidfile is None),
              "mqtt_broker_pidfile",
              "mqtt_passwd_file and mqtt_broker_pidfile go together")  # fmt: skip
        check(self.mqtt_passwd_file is None or bool(self.mqtt_username), "mqtt_passwd_file",
              "the password-file store needs the coordinator's own broker credential "
              "(mqtt_username, mqtt_password_file, mqtt_cafile)")  # fmt: skip

    def mqtt_credentials(self) -> MqttCredentials | None:
        """The coordinator's broker credential (None: anonymous); the password is read
        from ``mqtt_password_file`` here, a file that is missing or readable by group or
        others is a ``SettingsError``."""
        if not self.mqtt_username or self.mqtt_password_file is None:
            return None
        assert self.mqtt_cafile is not None
        path = self.mqtt_password_file
        try:
            mode = path.stat().st_mode
            secret = path.read_text().strip()
        except OSError as exc:
            raise SettingsError("mqtt_password_file", f"cannot read {path}: {exc}") from None
        check(not mode & 0o077, "mqtt_password_file",
              f"{path} is readable by group or others (chmod 600 it)")  # fmt: skip
        check(bool(secret), "mqtt_password_file", f"{path} is empty")
        return MqttCredentials(self.mqtt_username, secret, self.mqtt_cafile)

    def kafka_login(self) -> kafka_auth.KafkaAuth | None:
        """The SASL_SSL login when ``kafka_username`` is set (None: plain text); the
        password is read from its file here (missing or group-readable: SettingsError)."""
        return kafka_auth.kafka_auth(self.kafka_username, self.kafka_password_file,
                                     self.kafka_cafile, self.kafka_sasl_mechanism)  # fmt: skip

    def kafka_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments for every client this coordinator opens."""
        return {"bootstrap_servers": self.kafka_bootstrap,
                **kafka_auth.client_kwargs(self.kafka_login())}  # fmt: skip

    @property
    def brokers(self) -> tuple[Broker, ...]:
        """Every broker this coordinator ingests from, in the deployment's order (its
        index is what ``schemas.brokers`` hashes devices to)."""
        found = parse_brokers(self.mqtt_brokers)
        return found or (Broker(self.mqtt_host, self.mqtt_port),)

    @property
    def device_brokers(self) -> tuple[Broker, ...]:
        """The brokers enrolled devices connect to, in the deployment's order."""
        if self.device_mqtt_urls:
            return parse_brokers(self.device_mqtt_urls, "device_mqtt_urls")
        if len(self.brokers) == 1:
            host, port, tls = self.device_broker
            return (Broker(host, port, tls),)
        tls = self.mqtt_cafile is not None
        return tuple(Broker(b.host, b.port, tls) for b in self.brokers)

    @property
    def device_broker(self) -> tuple[str, int, bool]:
        """(host, port, tls) that enrolled devices connect to."""
        if self.device_mqtt_url:
            host, port, tls = parse_mqtt_url(self.device_mqtt_url)
            return host, port, tls
        return self.mqtt_host, self.mqtt_port, self.mqtt_cafile is not None

    # ----------------------------------------------------------------- topics
    @property
    def jobs_topic(self) -> str:
        return f"{self.topic_prefix}jobs"

    @property
    def journal_topic(self) -> str:
        """The coordinators' durable job record (compacted; see ``coordinator.journal``)."""
        return f"{self.topic_prefix}jobjournal"

    @property
    def credentials_topic(self) -> str:
        """Device credentials' durable record (compacted; ``coordinator.cred_journal``)."""
        return f"{self.topic_prefix}credentials"

    @property
    def tasks_topic(self) -> str:
        return f"{self.topic_prefix}tasks"

    @property
    def updates_topic(self) -> str:
        return f"{self.topic_prefix}updates"

    @property
    def models_topic(self) -> str:
        return f"{self.topic_prefix}models"

    @property
    def artifacts_topic(self) -> str:
        """Model artifacts (onnx jobs' graphs, chunked; ``coordinator.artifacts``)."""
        return f"{self.topic_prefix}artifacts"

    @property
    def key_prefix(self) -> str:
        """Prefix of every Redis key this coordinator writes."""
        return self.redis_prefix or f"ff:{self.topic_prefix}"

    @property
    def share_group(self) -> str:
        """MQTT shared-subscription group (``$share/<group>/...``)."""
        if self.mqtt_share_group:
            return self.mqtt_share_group
        if self.topic_prefix == "fl.":
            return "coord"
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in self.topic_prefix)
        return f"coord-{safe.strip('-')}"

    # ----------------------------------------------------------------- building
    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> CoordinatorSettings:
        """Read ``FEDFLEET_*`` variables (typed by the field hints), then apply overrides."""
        env = os.environ if env is None else env
        return settings.load(cls, env=env, prefix="FEDFLEET_", values=overrides)

    def replace(self, **changes: Any) -> CoordinatorSettings:
        return dataclasses.replace(self, **changes)


