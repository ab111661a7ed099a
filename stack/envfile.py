"""The stack file: where a running stack's servers are, for every command to read.

``fedfleet stack up`` writes one JSON file (default ``~/.cache/fedfleet/stack/stack.json``,
under ``$FEDFLEET_CACHE`` when set; ``$FEDFLEET_STACK_FILE`` names another path) with the
Kafka bootstrap, the MQTT broker, the Redis URL, the coordinator's default REST URL and an
admin token generated for the stack; ``stack down`` removes it. The same file records the
processes a detached stack leaves running (``StackInfo.pids``).

Commands read it when neither a flag nor an environment variable gives an address:
flag > env > stack file > built-in default. The services never read it themselves (they
are given addresses); the CLI layer fills it in, as :func:`service_env` names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.atomic import atomic_write
from stack.errors import ConfigError
from stack.kafka import cache_root
from stack.launcher import StackInfo, StackSettings

ENV_VAR = "FEDFLEET_STACK_FILE"
DEFAULT_COORDINATOR_URL = "http://127.0.0.1:8000"  # CoordinatorSettings' default host:port

# Environment variable prefix of each service's settings (see each ``settings.py``).
COORDINATOR, AGGREGATOR, AGENT = "FEDFLEET_", "FEDFLEET_AGG_", "FEDFLEET_AGENT_"
# The job CLI's own variables (the token is the coordinator's FEDFLEET_ADMIN_TOKEN).
URL_VAR, TOKEN_VAR = "FEDFLEET_COORDINATOR_URL", "FEDFLEET_ADMIN_TOKEN"
# the CA the coordinator's HTTPS certificate chains to (the job CLI, curl --cacert)
CA_VAR = "FEDFLEET_CA_FILE"


def path(env: Mapping[str, str] | None = None) -> Path:
    """Where the stack file is: ``$FEDFLEET_STACK_FILE``, else the cache's ``stack.json``."""
    env = os.environ if env is None else env
    override = env.get(ENV_VAR, "").strip()
    return Path(override).expanduser() if override else cache_root() / "stack" / "stack.json"


@dataclass(frozen=True, kw_only=True)
class StackFile:
    """The stack's servers (``info``), the coordinator URL its commands default to, and the
    admin token a coordinator started on it uses unless told otherwise."""

    info: StackInfo
    coordinator_url: str = DEFAULT_COORDINATOR_URL
    admin_token: str = ""

    def to_json(self) -> str:
        d = json.loads(self.info.to_json())
        d.update(coordinator_url=self.coordinator_url, admin_token=self.admin_token)
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackFile:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(StackInfo)}
        info = StackInfo.from_json(json.dumps({k: v for k, v in d.items() if k in names}))
        return cls(info=info, coordinator_url=str(d.get("coordinator_url") or
                                                  DEFAULT_COORDINATOR_URL),
                   admin_token=str(d.get("admin_token") or ""))  # fmt: skip


def read(where: Path | None = None) -> StackFile | None:
    """The stack file, or None when there is none; an unreadable one is a ``ConfigError``."""
    f = where or path()
    try:
        text = f.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"stack file {f}: {exc.strerror or exc}") from None
    try:
        return StackFile.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"stack file {f} is not a stack file ({exc}); "
                          "remove it or run `fedfleet stack down`") from None  # fmt: skip


def write(sf: StackFile, where: Path | None = None) -> Path:
    """Write the stack file (owner-only: it holds the admin token)."""
    f = where or path()
    try:
        atomic_write(f, sf.to_json().encode(), mode=0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the stack file {f}: {exc.strerror or exc}") from None
    return f


def remove(where: Path | None = None) -> bool:
    """Remove the stack file; False when there was none."""
    f = where or path()
    with contextlib.suppress(FileNotFoundError):
        f.unlink()
        return True
    return False


def service_env(sf: StackFile) -> dict[str, str]:
    """The stack file as the services' own environment variables (and the job CLI's)."""
    i = sf.info
    out = {
        # coordinator (CoordinatorSettings)
        f"{COORDINATOR}KAFKA_BOOTSTRAP": i.kafka_bootstrap,
        f"{COORDINATOR}MQTT_HOST": i.mqtt_host,
        f"{COORDINATOR}MQTT_PORT": str(i.mqtt_port),
        f"{COORDINATOR}REDIS_URL": i.redis_url,
        # aggregator (AggregatorSettings)
        f"{AGGREGATOR}KAFKA_BOOTSTRAP": i.kafka_bootstrap,
        # agent (AgentSettings)
        f"{AGENT}MQTT_HOST": i.mqtt_host,
        f"{AGENT}MQTT_PORT": str(i.mqtt_port),
        f"{AGENT}API_URL": sf.coordinator_url,
        # demo and loadtest (StackSettings: use these servers instead of starting some)
        "FEDFLEET_KAFKA": i.kafka_bootstrap,
        "FEDFLEET_MQTT": i.mqtt_url,
        "FEDFLEET_REDIS": i.redis_url,
        # fedfleet job
        URL_VAR: sf.coordinator_url,
    }
    if i.mqtt_tls:  # the secure broker: the coordinator's credential, agents' CA
        out.update({
            f"{COORDINATOR}MQTT_CAFILE": i.mqtt_cafile,
            f"{COORDINATOR}MQTT_USERNAME": i.mqtt_username,
            f"{COORDINATOR}MQTT_PASSWORD_FILE": i.mqtt_password_file,
            f"{COORDINATOR}REQUIRE_ENROLMENT": "1",
            f"{COORDINATOR}FLEET_READS_NEED_TOKEN": "1",
            f"{COORDINATOR}TLS_CERTFILE": i.tls_certfile,
            f"{COORDINATOR}TLS_KEYFILE": i.tls_keyfile,
            f"{AGENT}MQTT_CAFILE": i.mqtt_cafile,
            f"{AGENT}API_CAFILE": i.mqtt_cafile,  # the coordinator's HTTPS: the fleet CA
            CA_VAR: i.mqtt_cafile,
        })  # fmt: skip
    if i.kafka_cafile:  # SASL_SSL Kafka: each service's own login, the fleet CA
        for prefix, user in ((COORDINATOR, "coordinator"), (AGGREGATOR, "aggregator")):
            out.update({
                f"{prefix}KAFKA_USERNAME": user,
                f"{prefix}KAFKA_PASSWORD_FILE": i.kafka_password_file(user),
                f"{prefix}KAFKA_CAFILE": i.kafka_cafile,
            })  # fmt: skip
    if i.mqtt_brokers:  # several brokers: the coordinator ingests from every one
        out[f"{COORDINATOR}MQTT_BROKERS"] = ",".join(i.mqtt_brokers)
    if i.mqtt_passwd_file:
        out[f"{COORDINATOR}MQTT_PASSWD_FILE"] = i.mqtt_passwd_file
        out[f"{COORDINATOR}MQTT_BROKER_PIDFILE"] = i.mqtt_broker_pidfile
    if sf.admin_token:
        out[TOKEN_VAR] = sf.admin_token  # the coordinator's FEDFLEET_ADMIN_TOKEN too
    return out


def exports(sf: StackFile) -> list[str]:
    """``export NAME=value`` lines for a POSIX shell (``eval "$(fedfleet stack env)"``)."""
    return [f"export {k}={shlex.quote(v)}" for k, v in service_env(sf).items()]


def defaults_for(
    prefix: str, fields: set[str], env: Mapping[str, str] | None = None, sf: StackFile | None = None
) -> dict[str, Any]:
    """Stack-file values for the settings ``fields`` of the service whose env prefix is
    ``prefix``, leaving out every field its environment variable already sets (env wins).
    Empty when there is no stack file."""
    env = os.environ if env is None else env
    sf = sf if sf is not None else read()
    if sf is None:
        return {}
    out: dict[str, Any] = {}
    for name, value in service_env(sf).items():
        if not name.startswith(prefix):
            continue
        field = name[len(prefix) :].lower()
        if field in fields and env.get(name) is None:
            out[field] = value
    # host and port are one address: either set elsewhere means neither comes from here
    mqtt = ("mqtt_host", "mqtt_port")
    if any(f not in fields or env.get(prefix + f.upper()) is not None for f in mqtt):
        for f in mqtt:
            out.pop(f, None)
    return out


def with_stack_file(settings: StackSettings, sf: StackFile | None = None) -> StackSettings:
    """``settings`` with every server it does not name (by flag or env) taken from the stack
    file, so the demo and the load tests use a running stack instead of starting one."""
    sf = sf if sf is not None else read()
    if sf is None:
        return settings
    return dataclasses.replace(
        settings,
        kafka_url=settings.kafka_url or sf.info.kafka_bootstrap,
        mqtt_url=settings.mqtt_url or sf.info.mqtt_url,
        redis_url=settings.redis_url or sf.info.redis_url,
    )


__all__ = [
    "ENV_VAR", "StackFile", "defaults_for", "exports", "path", "read", "remove",
    "service_env", "with_stack_file", "write",
]  # fmt: skip
