"""``AgentSettings``: the one typed configuration object of the edge agent.

Built in one place from (highest precedence first) explicit values / CLI flags, environment
variables ``FEDFLEET_AGENT_<FIELD>`` and a TOML or JSON config file, then defaults.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import SettingsError
from schemas import errors as base
from schemas import settings
from schemas.brokers import parse_brokers
from schemas.topics import check_root

ENV_PREFIX = "FEDFLEET_AGENT_"
AGENT_VERSION = "0.1.0"


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentSettings:
    """Everything an ``EdgeAgent`` needs to know; immutable once built."""

    device_id: str
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    # the brokers (host:port) to fail over to, in order, when mqtt_host:mqtt_port (the home
    # broker) cannot be reached (schemas.brokers; enrolment stores the coordinator's list)
    mqtt_failover: tuple[str, ...] = ()
    # the deployment's MQTT namespace (schemas.topics); enrolment stores the coordinator's
    mqtt_topic_root: str = "fleet"
    mqtt_username: str = ""
    mqtt_password: str = ""
    # set: TLS to the broker, its certificate verified against this CA (never plain TCP);
    # an enrolled device gets all three from its credential (edge_agent.credentials)
    mqtt_cafile: Path | None = None
    # set: the coordinator's HTTPS certificate is verified against this CA only (else the
    # system's trust store); an enrolled device on an https api_url gets the fleet CA
    api_cafile: Path | None = None
    mqtt_keepalive_s: int = 30
    api_url: str = "http://127.0.0.1:8000"
    state_dir: Path | None = None  # None: in-memory outbox and model cache (simulation)
    telemetry_interval_s: float = 10.0
    model_name: str = ""  # empty: the model named by each task
    public_key_hex: str = ""  # pinned Ed25519 key; empty: fetch /v1/keys/model-signing once
    agent_version: str = AGENT_VERSION
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    resend_interval_s: float = 30.0  # re-publish un-acked updates this often
    # updates of at least this many bytes go over HTTP (POST {api_url}/v1/uploads), smaller
    # ones over MQTT; while MQTT is down every update goes over HTTP. 0: always HTTP
    http_upload_min_bytes: int = 512 << 10
    http_uploads: bool = True  # False: MQTT only
    http_timeout_s: float = 30.0
    max_model_bytes: int = 256 << 20
    inference: bool = True  # pull latest.onnx after each model pull (onnxruntime)
    outbox: Literal["auto", "file", "memory"] = "auto"  # auto: file iff state_dir is set
    metered: bool = False  # LinuxProbe: is the current network metered
    batches_per_step: int = 4  # training batches between gate checks / event-loop yields
    label_column: str = "label"  # CSV column (npz: key, "label" means "y") of the labels
    eval_fraction: float = 0.2  # share of local rows held out for eval tasks (holdout.py)
    feature_cols: tuple[str, ...] = ()
    data_path: Path | None = None
    seed: int = 0
    trainer: Literal["numpy", "torch"] = "numpy"  # torch needs the ``fedfleet[torch]`` extra
    idle_max_load: float = 0.5  # LinuxProbe: idle iff 1-min load average per CPU <= this
    idle_input_s: float = 300.0  # LinuxProbe: and no user input for this long (0: ignore)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # True: never fetch /v1/keys/model-signing (no trust on first use); without a pinned
    # key every model pull is refused ``key_not_pinned``
    require_pinned_key: bool = False
    # the pinned key as hex in a file (enrolment writes it), read when ``public_key_hex``
    # is empty and the file exists; None: ``{state_dir}/model-signing.pub``
    model_key_file: Path | None = None

    def __post_init__(self) -> None:
        check_root(self.mqtt_topic_root)
        if not self.device_id:
            raise SettingsError("device_id", "device_id is required")
        if not 0 < self.mqtt_port < 65536:
            raise SettingsError("mqtt_port", f"bad port {self.mqtt_port}")
        if self.telemetry_interval_s <= 0 or self.reconnect_min_s <= 0:
            raise SettingsError("interval", "intervals must be > 0")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingsError("reconnect", "reconnect_max_s < reconnect_min_s")
        if self.outbox not in ("auto", "file", "memory"):
            raise SettingsError("outbox", f"bad outbox kind {self.outbox!r}")
        if self.outbox == "file" and self.state_dir is None:
            raise SettingsError("outbox", "file outbox needs state_dir")
        if self.trainer not in ("numpy", "torch"):
            raise SettingsError("trainer", f"bad trainer {self.trainer!r}")
        if self.idle_max_load < 0 or self.idle_input_s < 0:
            raise SettingsError("idle", "idle thresholds must be >= 0")
        if not 0.0 <= self.eval_fraction < 1.0:  # also refuses NaN
            raise SettingsError("eval_fraction", f"eval_fraction must be in [0, 1), got "
                                                 f"{self.eval_fraction}")  # fmt: skip
        if self.http_upload_min_bytes < 0:
            raise SettingsError("http_upload_min_bytes", "http_upload_min_bytes must be >= 0")
        if self.mqtt_password and self.mqtt_cafile is None:
            raise SettingsError("mqtt_cafile", "a broker password is only sent over TLS: "
                                               "set mqtt_cafile (the fleet CA)")  # fmt: skip
        try:
            self.failover_brokers  # noqa: B018 - validates the list
        except base.SettingsError as exc:
            raise SettingsError(exc.code, exc.detail) from None
        if not self.label_column:
            raise SettingsError("label_column", "label_column must not be empty")

    @property
    def failover_brokers(self) -> list[tuple[str, int]]:
        """``mqtt_failover`` as (host, port) pairs."""
        return [(b.host, b.port) for b in parse_brokers(self.mqtt_failover, "mqtt_failover")]

    @property
    def durable(self) -> bool:
        """True when outbox, residual and model cache live on disk."""
        return self.outbox == "file" or (self.outbox == "auto" and self.state_dir is not None)

    def topic(self, leaf: str) -> str:
        """``<root>/<device_id>/<leaf>`` (``schemas.topics``)."""
        return f"{self.mqtt_topic_root}/{self.device_id}/{leaf}"

    @classmethod
    def load(
        cls,
        values: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> AgentSettings:
        """Merge config file < env < ``values`` (flags; ``None`` values are ignored)."""
        merged: dict[str, Any] = {}
        env = os.environ if env is None else env
        cfg = config_file or (values or {}).get("config") or env.get(ENV_PREFIX + "CONFIG")
        if cfg:
            merged.update(_read_config(Path(cfg)))
        flags = {k: v for k, v in (values or {}).items() if k != "config"}
        if not (
            flags.get("device_id") or env.get(ENV_PREFIX + "DEVICE_ID") or merged.get("device_id")
        ):
            raise SettingsError("device_id", "device_id is required")
        try:
            return settings.load(cls, env=env, prefix=ENV_PREFIX, config=merged, values=flags)
        except SettingsError:
            raise
        except base.SettingsError as exc:
            raise SettingsError(exc.code, exc.detail) from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except (OSError, ValueError) as exc:
        raise SettingsError("config", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError("config", f"{path} must hold a table/object")
    section = data.get("agent", data)
    return dict(section) if isinstance(section, dict) else {}
