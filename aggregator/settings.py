"""Typed settings of an aggregator worker, built from the environment or the CLI in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aggregator.errors import ConfigError
from aggregator.strategies import StrategyOptions
from schemas import kafka_auth, settings
from schemas.errors import SettingsError
from schemas.messages import UPDATE_MAX_BYTES

ENV_PREFIX = "FEDFLEET_AGG_"


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorSettings:
    """Everything a shard worker needs; pass it explicitly to :class:`AggregatorWorker`."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    group_id: str = "fl-aggregators"
    topic_prefix: str = "fl."  # topics {prefix}jobs, {prefix}updates, {prefix}models
    client_id: str = "fedfleet-aggregator"
    checkpoint_dir: str = "var/aggregator"
    publish_every: int | None = None  # overrides JobSpec.publish_every when set
    # announce only if >= publish_every versions AND >= this much stream time (records'
    # accepted_ts) since the last announcement; a quiet, caught-up shard announces its
    # newest version after this long. 0 = plain publish_every cadence, no idle announcement.
    min_publish_interval_s: float = 0.2
    max_update_bytes: int = UPDATE_MAX_BYTES  # ShardUpdate record / codec frame bound
    max_message_bytes: int = 32 << 20  # producer request size (ShardVersion of big slices)
    history_size: int = 16  # announced slices kept in memory per job shard (exact FedAsync)
    # older announced slices stay in the checkpoint store while records of the last this
    # many seconds (stream time) may still name them (aggregator.bases.SeenFloor)
    seen_window_s: float = 600.0
    dedupe_window: int = 100_000  # applied update ids remembered per partition
    checkpoint_every: int = 500  # records per partition between checkpoints
    checkpoint_interval_s: float = 5.0  # ... or this long, whichever comes first
    topic_wait_s: float = 30.0  # start() waits this long for the three topics to exist
    # an onnx job whose artifact a full read of the artifacts topic does not find is looked
    # for this long, then set aside (its records rejected ``artifact_missing``); Kafka not
    # answering is retried without a bound (no job on the worker can progress then)
    artifact_wait_s: float = 120.0
    poll_timeout_ms: int = 200
    max_poll_records: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    # defaults for jobs whose StrategyConfig leaves robust / trim_ratio / dp_noise_multiplier
    # unset (None); a job's own value always wins
    robust: Literal["mean", "median", "trimmed_mean"] = "mean"  # FedBuff reducer
    trim_ratio: float = 0.1
    dp_noise_multiplier: float = 0.0
    dp_seed: int = 0
    models_zstd_level: int = -1  # ShardVersion params; float32 barely compresses, stay fast
    metrics_port: int | None = None  # serve Prometheus metrics when set
    # Kafka over SASL_SSL (the secure stack; schemas.kafka_auth): TLS verified against
    # kafka_cafile, a SCRAM login as kafka_username, its password in kafka_password_file
    kafka_username: str = ""  # "" = plain text, no login
    kafka_password_file: Path | None = None
    kafka_cafile: Path | None = None
    kafka_sasl_mechanism: str = kafka_auth.DEFAULT_MECHANISM

    def __post_init__(self) -> None:
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise ConfigError(why)

        need(bool(self.kafka_bootstrap.strip()), "kafka_bootstrap must not be empty")
        need(bool(self.group_id.strip()), "group_id must not be empty")
        need(self.publish_every is None or self.publish_every >= 1, "publish_every must be >= 1")
        for name in ("min_publish_interval_s", "seen_window_s", "topic_wait_s", "trim_ratio",
                     "dp_noise_multiplier"):  # fmt: skip
            need(getattr(self, name) >= 0.0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("history_size", "dedupe_window", "checkpoint_every", "max_poll_records",
                     "max_update_bytes", "max_message_bytes", "session_timeout_ms",
                     "heartbeat_interval_ms"):  # fmt: skip
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.checkpoint_interval_s > 0.0, "checkpoint_interval_s must be > 0")
        need(self.poll_timeout_ms >= 0, "poll_timeout_ms must be >= 0")
        need(self.heartbeat_interval_ms < self.session_timeout_ms,
             "heartbeat_interval_ms must be below session_timeout_ms")  # fmt: skip
        need(self.trim_ratio < 0.5, "trim_ratio must be < 0.5")
        need(self.robust in ("mean", "median", "trimmed_mean"), f"robust {self.robust!r} is "
             "not one of mean, median, trimmed_mean")  # fmt: skip
        need(-7 <= self.models_zstd_level <= 22, "models_zstd_level must be in [-7, 22]")
        need(self.metrics_port is None or 0 <= self.metrics_port <= 65535,
             f"metrics_port must be in 0..65535, got {self.metrics_port}")  # fmt: skip
        try:
            kafka_auth.check_kafka_auth(self.kafka_username, self.kafka_password_file,
                                        self.kafka_cafile, self.kafka_sasl_mechanism)  # fmt: skip
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None

    def kafka_login(self) -> kafka_auth.KafkaAuth | None:
        """The SASL_SSL login when ``kafka_username`` is set (None: plain text); the
        password is read from its file here (missing or group-readable: ConfigError)."""
        try:
            return kafka_auth.kafka_auth(self.kafka_username, self.kafka_password_file,
                                         self.kafka_cafile, self.kafka_sasl_mechanism)  # fmt: skip
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None

    def kafka_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments for every client this worker opens."""
        return {"bootstrap_servers": self.kafka_bootstrap,
                **kafka_auth.client_kwargs(self.kafka_login())}  # fmt: skip

    @property
    def jobs_topic(self) -> str:
        return f"{self.topic_prefix}jobs"

    @property
    def updates_topic(self) -> str:
        return f"{self.topic_prefix}updates"

    @property
    def models_topic(self) -> str:
        return f"{self.topic_prefix}models"

    @property
    def artifacts_topic(self) -> str:
        """Model artifacts (onnx jobs' graphs, chunked; ``aggregator.artifacts``)."""
        return f"{self.topic_prefix}artifacts"

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(
            history_size=self.history_size,
            robust=self.robust,
            trim_ratio=self.trim_ratio,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_seed=self.dp_seed,
        )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        prefix: str = ENV_PREFIX,
        **overrides: object,
    ) -> AggregatorSettings:
        """Read ``FEDFLEET_AGG_<FIELD>`` variables (e.g. ``FEDFLEET_AGG_KAFKA_BOOTSTRAP``),
        then apply ``overrides`` (flags); see :mod:`schemas.settings`."""
        env = os.environ if environ is None else environ
        return settings.load(cls, env=env, prefix=prefix, values=overrides)
