"""MQTT ingest: route device messages to the fleet store, task leases, the upload handler
and the report handler (evaluation / statistics reports).

``Router.handle(topic, payload)`` is the whole per-message logic (no MQTT objects), so it
can be driven directly in tests; ``TelemetryBatcher`` coalesces telemetry into Redis
pipelines. Every bad input is counted in ``fedfleet_coord_rejected_total{source, reason}``
and dropped: a schema reason (``range``: a value outside its bounds, ...),
``device_mismatch`` (payload device != topic device), ``rate_limited`` (over the device's
limit, checked before decoding: ``coordinator.ratelimit``; an update is answered
``rejected``/``rate_limited``) or ``clock_skew`` (telemetry whose ``ts`` is more than
``max_ahead_s`` ahead of or ``max_behind_s`` behind the coordinator's clock).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from coordinator.aborts import AbortHandler
from coordinator.fleet import FleetStore
from coordinator.jobstats import JobStatsStore
from coordinator.link import INGEST_LEAVES
from coordinator.metrics import CoordinatorMetrics
from coordinator.ratelimit import RATE_LIMITED, DeviceLimits, rate_limited_ack
from coordinator.reports import ReportHandler
from coordinator.tasks import TaskStore
from coordinator.uploads import UploadHandler
from schemas.aio import cancelling
from schemas.errors import SchemaError
from schemas.messages import (
    UPDATE_MAX_BYTES,
    DeviceStatus,
    EvalReport,
    StatsReport,
    TaskResponse,
    Telemetry,
    Update,
    decode,
    decode_any,
    encode,
)

log = logging.getLogger(__name__)


NOT_ENROLLED = "not_enrolled"


def clock_ok(ts: float, now: float, max_ahead_s: float, max_behind_s: float) -> bool:
    """Whether a device's ``ts`` is a reading of ``now`` (within the skew window)."""
    return now - max_behind_s <= ts <= now + max_ahead_s


# which of these device ids may be in the fleet (hold a valid credential): one round trip
Admit = Callable[[list[str]], Awaitable[set[str]]]


class TelemetryBatcher:
    """Latest telemetry per device, flushed to Redis in one pipeline per batch; with
    ``admit``, telemetry of ids it does not admit is refused (``not_enrolled``)."""

    def __init__(
        self, fleet: FleetStore, metrics: CoordinatorMetrics, *, batch: int, interval_s: float,
        admit: Admit | None = None,
    ) -> None:  # fmt: skip
        self.fleet = fleet
        self.metrics = metrics
        self.batch = batch
        self.interval = interval_s
        self.admit = admit
        self._buf: dict[str, Telemetry] = {}
        self._wake = asyncio.Event()

    def add(self, t: Telemetry) -> None:
        self._buf[t.device_id] = t
        if len(self._buf) >= self.batch:
            self._wake.set()

    def drop(self, device_id: str) -> None:
        self._buf.pop(device_id, None)

    async def flush(self) -> int:
        if not self._buf:
            return 0
        buf, self._buf = self._buf, {}
        if self.admit is not None:
            ok = await self.admit(list(buf))
            for dev in [d for d in buf if d not in ok]:
                del buf[dev]
                self.metrics.rejected.labels(source="telemetry", reason=NOT_ENROLLED).inc()
        n = await self.fleet.write_telemetry(buf.values())
        self.metrics.telemetry_written.inc(n)
        return n

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # Redis hiccup: keep the loop alive, count it
                if cancelling():
                    raise asyncio.CancelledError from None
                self.metrics.errors.labels(loop="telemetry").inc()
                log.exception("telemetry flush failed")
                await asyncio.sleep(self.interval)


class Router:
    def __init__(
        self,
        *,
        fleet: FleetStore,
        tasks: TaskStore,
        stats: JobStatsStore,
        uploads: UploadHandler,
        batcher: TelemetryBatcher,
        metrics: CoordinatorMetrics,
        aborts: AbortHandler | None = None,
        reports: ReportHandler | None = None,
        limits: DeviceLimits | None = None,
        max_ahead_s: float = math.inf,
        max_behind_s: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``limits``: per-device rate limits (None: none); ``max_ahead_s`` /
        ``max_behind_s``: the telemetry clock window around ``clock()``."""
        self.fleet = fleet
        self.tasks = tasks
        self.stats = stats
        self.uploads = uploads
        self.batcher = batcher
        self.metrics = metrics
        self.aborts = aborts
        self.reports = reports
        self.limits = limits
        self.max_ahead_s = max_ahead_s
        self.max_behind_s = max_behind_s
        self.clock = clock

    def _reject(self, kind: str, reason: str) -> None:
        self.metrics.rejected.labels(source=kind, reason=reason).inc()

    async def handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "fleet" or parts[2] not in INGEST_LEAVES:
            self._reject("topic", "unknown_topic")
            return
        dev, kind = parts[1], parts[2]
        self.metrics.messages.labels(kind=kind).inc()
        if self.limits is not None and not self.limits.allow(kind, dev):
            self._reject(kind, RATE_LIMITED)
            if kind == "update":
                await self._refuse_upload(payload, dev)
            return
        try:
            if kind == "telemetry":
                t = decode(payload, Telemetry)
                if t.device_id != dev:
                    self._reject(kind, "device_mismatch")
                    return
                if not clock_ok(t.ts, self.clock(), self.max_ahead_s, self.max_behind_s):
                    self._reject(kind, "clock_skew")
                    return
                self.batcher.add(t)
            elif kind == "status":
                if not payload:  # retained message cleared
                    return
                s = decode(payload, DeviceStatus)
                if s.device_id != dev:
                    self._reject(kind, "device_mismatch")
                    return
                if s.state == "offline":
                    self.batcher.drop(dev)
                elif self.batcher.admit is not None and not await self.batcher.admit([dev]):
                    self._reject(kind, NOT_ENROLLED)
                    return
                await self.fleet.write_status(s)
            elif kind == "task_status":
                await self._task_status(decode(payload, TaskResponse), dev)
            elif kind == "report":
                await self._report(decode_any(payload, max_bytes=UPDATE_MAX_BYTES), dev)
            else:
                await self.uploads.handle(decode(payload, Update, max_bytes=UPDATE_MAX_BYTES), dev)
        except SchemaError as exc:
            self._reject(kind, exc.reason)

    async def _refuse_upload(self, payload: bytes, dev: str) -> None:
        """Answer an update over the device's limit ``rejected``/``rate_limited`` (already
        counted); one that does not decode, or names another device, gets no answer."""
        try:
            upd = decode(payload, Update, max_bytes=UPDATE_MAX_BYTES)
        except SchemaError:
            return
        if upd.device_id != dev:
            return  # never answer on a topic the sender does not own
        self.metrics.uploads.labels(status="rejected").inc()
        await self.uploads.publish(f"fleet/{dev}/ack", encode(rate_limited_ack(upd)), 1)

    async def _report(self, msg: object, dev: str) -> None:
        if not isinstance(msg, EvalReport | StatsReport):
            self._reject("report", "kind")
            return
        if self.reports is None:
            self._reject("report", "unsupported")
            return
        await self.reports.handle(msg, dev)

    async def _task_status(self, r: TaskResponse, dev: str) -> None:
        if r.device_id != dev:
            self._reject("task_status", "device_mismatch")
            return
        rec = await self.tasks.get(r.task_id)
        if rec is None or rec.device_id != dev:
            self._reject("task_status", "unknown_task")
            return
        if r.status == "accepted":
            ok, _ = await self.tasks.transition(
                rec, "accepted", ("offered",), accepted_ts=repr(time.time())
            )
        else:
            ok, _ = await self.tasks.transition(
                rec, r.status, ("offered", "accepted"), reason=r.reason[:200]
            )
            if ok:
                outcome: str = r.status
                # an eval task's abort (no held-out split, ...) says nothing about the
                # device's training data: no data hold, no failing the job
                if r.status == "aborted" and self.aborts is not None and rec.kind != "eval":
                    code = await self.aborts.on_abort(rec.job_id, dev, r.reason, time.time())
                    outcome = f"aborted:{code}"
                await self.fleet.release_task(dev, rec.task_id, contributed=False, outcome=outcome)
                side = "" if rec.kind == "train" else f"{rec.kind}_"  # tasks_eval_declined
                await self.stats.bump(rec.job_id, f"tasks_{side}{r.status}")
        if not ok:
            self._reject("task_status", "bad_transition")
