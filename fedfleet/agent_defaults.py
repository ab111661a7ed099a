"""Stack-file defaults for ``fedfleet agent``, filled in before ``edge_agent.cli`` runs.

The agent builds its settings itself (``AgentSettings.load``: config file < env < flags)
and never reads the stack file; the CLI puts the stack file's MQTT broker and coordinator
URL into the agent's environment variables for the fields that no flag, environment
variable or config file sets, so the precedence stays flag > env > config > stack file >
default. The variables are set only while the agent command runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from stack import envfile

FIELDS = {"mqtt_host", "mqtt_port", "api_url", "mqtt_cafile", "api_cafile"}
FLAGS = {"--mqtt": ("mqtt_host", "mqtt_port"), "--api": ("api_url",),
         "--mqtt-ca": ("mqtt_cafile",)}  # fmt: skip


def _given_by_flags(argv: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for arg in argv:
        name = arg.split("=", 1)[0]
        out.update(FLAGS.get(name, ()))
    return out


def _config_path(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return env.get(envfile.AGENT + "CONFIG") or None


def _given_by_config(cfg: str | None) -> set[str]:
    """Keys the agent's config file sets (unreadable: none; the agent reports it)."""
    if not cfg:
        return set()
    p = Path(cfg)
    try:
        data = json.loads(p.read_bytes()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (OSError, ValueError):
        return set()
    section = data.get("agent", data) if isinstance(data, dict) else {}
    return set(section) if isinstance(section, dict) else set()


def agent_env(argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``FEDFLEET_AGENT_*`` variables to add for this agent command line."""
    env = os.environ if env is None else env
    taken = _given_by_flags(argv) | _given_by_config(_config_path(argv, env))
    if taken & {"mqtt_host", "mqtt_port"}:
        taken |= {"mqtt_host", "mqtt_port"}
    values = envfile.defaults_for(envfile.AGENT, FIELDS - taken, env)
    out = {envfile.AGENT + k.upper(): str(v) for k, v in values.items()}
    if argv[:1] == ["enrol"] and not env.get(envfile.TOKEN_VAR):
        # the operator enrolling a device on the stack's own machine: its admin token
        sf = envfile.read()
        if sf is not None and sf.admin_token:
            out[envfile.TOKEN_VAR] = sf.admin_token
    return out


@contextlib.contextmanager
def stack_file_env(argv: Sequence[str]) -> Iterator[dict[str, str]]:
    """Set :func:`agent_env`'s variables in ``os.environ`` while the block runs."""
    added = agent_env(argv)
    os.environ.update(added)
    try:
        yield added
    finally:
        for k in added:
            os.environ.pop(k, None)


__all__ = ["agent_env", "stack_file_env"]
