"""The device-side resource gate: a pure function of a probe reading and a task's limits."""

from __future__ import annotations

from edge_agent.probe import ProbeReading


def gate_reason(r: ProbeReading, *, min_battery: float, allow_metered: bool) -> str | None:
    """``None`` if training may run now, else a short reason (``TaskResponse.reason``).

    Rules: a network is needed; battery must be >= ``min_battery`` unless charging; a
    metered network is forbidden unless ``allow_metered``.
    """
    if r.network == "none":
        return "offline"
    if not r.charging and r.battery < min_battery:
        return "low_battery"
    if r.metered and not allow_metered:
        return "metered"
    return None


def abort_reason(
    before: ProbeReading, now: ProbeReading, *, min_battery: float, allow_metered: bool
) -> str | None:
    """Re-check during training. Same rules as ``gate_reason``; a battery failure on a device
    that was charging at acceptance and no longer is reported as ``unplugged``."""
    reason = gate_reason(now, min_battery=min_battery, allow_metered=allow_metered)
    if reason == "low_battery" and before.charging and not now.charging:
        return "unplugged"
    return reason
