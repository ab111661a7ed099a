"""Test-only crash points: die like a device losing power at a chosen point.

``AgentSettings.crash_at`` (env ``FEDFLEET_AGENT_CRASH_AT``) names one of
``settings.CRASH_POINTS``; when the agent reaches it, the process prints one line
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

from edge_agent.settings import AgentSettings


def crash_point(settings: AgentSettings, point: str) -> None:
    """SIGKILL this process if ``settings.crash_at == point`` (else return at once)."""
    if not settings.crash_at or settings.crash_at != point:
        return
    sys.stdout.write(f"fedfleet-agent: crash point {point}\n")
    sys.stdout.flush()
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None:
        os.kill(os.getpid(), sigkill)
    os._exit(137)  # no SIGKILL on this platform: the nearest equivalent
