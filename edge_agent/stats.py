"""Counters of one agent (read by the load test and the simulator)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class AgentStats:
    tasks_received: int = 0  # messages on fleet/{id}/task, valid or not
    tasks_invalid: int = 0  # failed strict decode or wrong device id
    tasks_duplicate: int = 0  # redelivered task ids (not trained twice)
    tasks_accepted: int = 0
    tasks_declined: int = 0
    tasks_aborted: int = 0
    tasks_completed: int = 0  # update built and put in the outbox
    tasks_resumed: int = 0  # accepted before a crash, training restarted after it
    reports_sent: int = 0  # EvalReport / StatsReport published (eval and stats tasks)
    reports_unsent: int = 0  # built, but the link stayed down until the task's deadline
    updates_sent: int = 0  # update publishes, including re-sends
    updates_sent_http: int = 0  # of those, over HTTP (POST /v1/uploads)
    update_bytes: int = 0  # update frames' bytes sent over either transport, incl. re-sends
    updates_acked: int = 0  # accepted or duplicate
    updates_rejected: int = 0
    acks_stale: int = 0  # acks for updates not in the outbox
    bytes_sent: int = 0  # all MQTT payload bytes published
    telemetry_sent: int = 0
    paced: int = 0
    connects: int = 0
    disconnects: int = 0
    model_pulls: int = 0
    model_errors: int = 0
    onnx_swaps: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
