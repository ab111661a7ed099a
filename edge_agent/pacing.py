"""Compute pacing: what the agent does between the last training slice and encoding.

``ComputePacer.after_training(samples, recheck)`` is awaited once per task, after real
training and while the resource gate still applies; ``recheck()`` raises ``Aborted`` when
the gate or the deadline now fails. ``EdgeAgent(pacer=...)`` injects one:

* ``RealCompute`` (the default) returns at once: a real device's training time is the
  time its training took;
* ``SimulatedCompute(probe)`` waits ``probe.compute_delay(samples)`` on top, calling
  ``recheck()`` every ``gate_check_s``, so a slow simulated device is busy (and can be
  unplugged mid-task) for as long as its ``compute_speed`` says. The simulator
  (``sim.hetero.sim_agent``) and ``fedfleet agent --probe simulated`` inject it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from edge_agent.probe import DeviceProbe


class ComputePacer(Protocol):
    async def after_training(self, samples: int, recheck: Callable[[], None]) -> None:
        """Called after ``samples`` sample-steps of real training; may wait, calling
        ``recheck()`` (which raises ``Aborted``) while it does."""
        ...


class RealCompute:
    """No pacing: the default of every agent."""

    async def after_training(self, samples: int, recheck: Callable[[], None]) -> None:
        return None


class SimulatedCompute:
    """Wait out ``probe.compute_delay(samples)``, re-checking every ``gate_check_s``."""

    def __init__(self, probe: DeviceProbe, *, gate_check_s: float = 0.25) -> None:
        if gate_check_s <= 0:
            raise ValueError("gate_check_s must be > 0")
        self.probe = probe
        self.gate_check_s = gate_check_s

    async def after_training(self, samples: int, recheck: Callable[[], None]) -> None:
        remaining = self.probe.compute_delay(samples)
        while remaining > 0:
            step = min(remaining, self.gate_check_s)
            await asyncio.sleep(step)
            remaining -= step
            recheck()
