"""``AgentSettings``: the one typed configuration object of the edge agent.

Built in one place from (highest precedence first) explicit values / CLI flags, environment
variables ``FEDFLEET_AGENT_<FIELD>`` and a TOML or JSON config file, then defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import SettingsError

ENV_PREFIX = "FEDFLEET_AGENT_"
AGENT_VERSION = "0.1.0"
# Test-only crash points (``FEDFLEET_AGENT_CRASH_AT``), see ``edge_agent.crash``.
CRASH_POINTS = ("during_training", "after_outbox", "before_publish")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentSettings:
    """Everything an ``EdgeAgent`` needs to know; immutable once built."""

    device_id: str
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = ""
    mqtt_password: str = ""
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
    http_timeout_s: float = 30.0
    max_model_bytes: int = 256 << 20
    inference: bool = True  # pull latest.onnx after each model pull (onnxruntime)
    outbox: Literal["auto", "file", "memory"] = "auto"  # auto: file iff state_dir is set
    metered: bool = False  # LinuxProbe: is the current network metered
    batches_per_step: int = 4  # training batches between gate checks / event-loop yields
    gate_check_s: float = 0.25  # gate re-check period while waiting out simulated compute
    simulate_compute: bool = True  # wait probe.compute_delay() after real training
    label_col: str = "label"
    feature_cols: tuple[str, ...] = ()
    data_path: Path | None = None
    seed: int = 0
    trainer: Literal["numpy", "torch"] = "numpy"  # torch needs the ``fedfleet[torch]`` extra
    idle_max_load: float = 0.5  # LinuxProbe: idle iff 1-min load average per CPU <= this
    idle_input_s: float = 300.0  # LinuxProbe: and no user input for this long (0: ignore)
    crash_at: str = ""  # test only: SIGKILL the process at this point (CRASH_POINTS)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        if self.crash_at and self.crash_at not in CRASH_POINTS:
            raise SettingsError("crash_at", f"unknown crash point {self.crash_at!r}")

    @property
    def durable(self) -> bool:
        """True when outbox, residual and model cache live on disk."""
        return self.outbox == "file" or (self.outbox == "auto" and self.state_dir is not None)

    def topic(self, leaf: str) -> str:
        return f"fleet/{self.device_id}/{leaf}"

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
        names = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            key = ENV_PREFIX + name.upper()
            if key in env:
                merged[name] = env[key]
        for k, v in (values or {}).items():
            if v is not None and k != "config":
                merged[k] = v
        unknown = set(merged) - names
        if unknown:
            raise SettingsError("unknown", f"unknown settings {sorted(unknown)}")
        if not merged.get("device_id"):
            raise SettingsError("device_id", "device_id is required")
        return cls(**{k: _coerce(k, v) for k, v in merged.items()})


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


_INT = {"mqtt_port", "mqtt_keepalive_s", "max_model_bytes", "batches_per_step", "seed"}
_FLOAT = {
    "telemetry_interval_s",
    "reconnect_min_s",
    "reconnect_max_s",
    "resend_interval_s",
    "http_timeout_s",
    "gate_check_s",
    "idle_max_load",
    "idle_input_s",
}
_BOOL = {"inference", "metered", "simulate_compute"}
_PATH = {"state_dir", "data_path"}


def _coerce(name: str, value: Any) -> Any:
    try:
        if name in _INT:
            return int(value)
        if name in _FLOAT:
            return float(value)
        if name in _BOOL:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if name in _PATH:
            return None if value in ("", None) else Path(value)
        if name == "feature_cols":
            if isinstance(value, str):
                return tuple(c.strip() for c in value.split(",") if c.strip())
            return tuple(str(c) for c in value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(name, f"bad value {value!r}: {exc}") from None
    return value
