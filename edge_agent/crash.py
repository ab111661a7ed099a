"""Test-only crash points: die like a device losing power at a chosen point.

``CrashPoints(at)`` is the hook object the agent calls at each point (``hit(point)``),
injected as ``EdgeAgent(crash=...)``; the default, ``CrashPoints()``, never fires, and no
setting or environment variable turns one on. ``tests/crashing_agent.py`` is the entry
point that runs the normal agent CLI with ``CrashPoints(at)``. When the agent reaches
``at``, the process prints one line ``fedfleet-agent: crash point <name>`` to stdout and
sends itself ``SIGKILL``: no ``finally`` blocks, no MQTT DISCONNECT (the broker fires the
last will), no flush of anything that is not already on disk. The points
(``CRASH_POINTS``):

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

CRASH_POINTS = ("during_training", "after_outbox", "before_publish")


class CrashPoints:
    """``hit(point)`` SIGKILLs this process at ``at`` (``""``: never, the default).

    An ``at`` that is not one of ``CRASH_POINTS`` raises ``SettingsError`` (code
    ``crash_point``).
    """

    def __init__(self, at: str = "") -> None:
        if at and at not in CRASH_POINTS:
            raise SettingsError("crash_point", f"unknown crash point {at!r}")
        self.at = at

    def hit(self, point: str) -> None:
        if self.at and self.at == point:
            _die(point)


def _die(point: str) -> None:
    sys.stdout.write(f"fedfleet-agent: crash point {point}\n")
    sys.stdout.flush()
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None:
        os.kill(os.getpid(), sigkill)
    os._exit(137)  # no SIGKILL on this platform: the nearest equivalent
