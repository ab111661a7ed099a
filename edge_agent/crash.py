"""Test-only crash points: die like a device losing power at a chosen point.

``CrashPoints(at)`` is the hook object the agent calls at each point (``hit(point)``);
``EdgeAgent(crash=...)`` injects one, the default is ``CrashPoints.from_settings`` with
``AgentSettings.crash_at`` (env ``FEDFLEET_AGENT_CRASH_AT``), one of
``settings.CRASH_POINTS``. When the agent reaches ``at``, the process prints one line
``fedfleet-agent: crash point <name>`` to stdout and sends itself ``SIGKILL``: no ``finally``
blocks, no MQTT DISCONNECT (the broker fires the last will), no flush of anything that is
not already on disk. Empty (the default) makes every call a no-op.

* ``during_training`` — after the first training slice (task accepted, no update yet);
* ``after_outbox`` — right after the update is written to the outbox, before the residual
  is saved and the task file removed, before any publish;
* ``before_publish`` — outbox, residual and task list all written, nothing published.
"""

from __future__ import annotations

import os
import signal
import sys

from edge_agent.errors import SettingsError
from edge_agent.settings import CRASH_POINTS, AgentSettings


class CrashPoints:
    """``hit(point)`` SIGKILLs this process at ``at`` (``""``: never, the default)."""

    def __init__(self, at: str = "") -> None:
        if at and at not in CRASH_POINTS:
            raise SettingsError("crash_at", f"unknown crash point {at!r}")
        self.at = at

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> CrashPoints:
        return cls(settings.crash_at)

    def hit(self, point: str) -> None:
        if self.at and self.at == point:
            _die(point)


def crash_point(settings: AgentSettings, point: str) -> None:
    """SIGKILL this process if ``settings.crash_at == point`` (else return at once)."""
    CrashPoints.from_settings(settings).hit(point)


def _die(point: str) -> None:
    sys.stdout.write(f"fedfleet-agent: crash point {point}\n")
    sys.stdout.flush()
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None:
        os.kill(os.getpid(), sigkill)
    os._exit(137)  # no SIGKILL on this platform: the nearest equivalent
