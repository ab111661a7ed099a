"""What the coordinator does with a task a device aborted: count it by reason (job stats
``aborts.<code>``, ``fedfleet_coord_task_aborts_total{job,reason}``), hold a device whose
data cannot train the job off that job for ``data_hold_s`` (no re-issue storm), and fail
a job that never got an update while its tasks keep aborting for one data reason."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from coordinator.fleet import FleetStore
from coordinator.jobstats import JobStatsStore
from coordinator.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)

_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
FailJob = Callable[[str, str], Awaitable[None]]


# reasons that say this device cannot train this job (its data, or an onnx job's model on
# it: no PyTorch, a graph it cannot convert, a forward pass that differs from onnxruntime):
# the device is held off the job, and a job that gets nothing but these fails
DEVICE_CANNOT = ("data_", "model_mismatch", "model_unsupported", "trainer_unavailable")


def abort_code(reason: str) -> str:
    """The counted code of an abort reason (``data_features: 5 features ...`` ->
    ``data_features``); anything else a device sends is ``other`` (bounded labels)."""
    head = reason.split(":", 1)[0].strip().lower()
    return head if _CODE.fullmatch(head) else "other"


class AbortHandler:
    def __init__(
        self, *, fleet: FleetStore, stats: JobStatsStore, metrics: CoordinatorMetrics,
        hold_s: float, fail_after: int, fail_job: FailJob | None = None,
    ) -> None:  # fmt: skip
        self.fleet = fleet
        self.stats = stats
        self.metrics = metrics
        self.hold_s = hold_s
        self.fail_after = fail_after
        self.fail_job = fail_job

    async def on_abort(self, job_id: str, device_id: str, reason: str, now: float) -> str:
        code = abort_code(reason)
        n = await self.stats.bump(job_id, f"aborts.{code}")
        self.metrics.task_aborts.labels(job=job_id, reason=code).inc()
        if code.startswith(DEVICE_CANNOT):
            await self.fleet.hold(job_id, device_id, now + self.hold_s)
            if (self.fail_job is not None and n >= self.fail_after
                    and await self.stats.get(job_id, "updates_accepted") == 0):  # fmt: skip
                log.warning("job %s: %d tasks aborted %s and no update accepted: failing it",
                            job_id, n, code)  # fmt: skip
                await self.fail_job(job_id, reason)
        return code
