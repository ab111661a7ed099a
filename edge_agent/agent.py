"""``EdgeAgent``: MQTT session, telemetry, task execution, outbox and on-device inference.

Lifecycle (aiokafka-style): ``start()``/``stop()`` are idempotent, ``async with`` calls them,
``await agent.run()`` blocks until ``stop()``. The MQTT session (last will = retained
``offline`` status) reconnects with exponential backoff and jitter; a task in progress and
the outbox survive reconnects. See ``docs/edge_agent.md``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiomqtt
import httpx
import numpy as np
import numpy.typing as npt

from edge_agent.crash import crash_point
from edge_agent.data import Dataset
from edge_agent.errors import Aborted, AgentError, NoModelError
from edge_agent.execution import Encoded, train_and_encode
from edge_agent.gate import gate_reason
from edge_agent.inference import OnnxModel
from edge_agent.models import ModelClient, VerifiedModel
from edge_agent.outbox import FileOutbox, MemoryOutbox, Outbox
from edge_agent.probe import DeviceProbe, ProbeReading
from edge_agent.session import DeviceSession, cancel_all
from edge_agent.settings import AgentSettings
from edge_agent.stats import AgentStats
from edge_agent.trainer_factory import make_trainer
from edge_agent.trainers import Trainer
from schemas.errors import SchemaError
from schemas.messages import (
    Pace,
    Task,
    TaskResponse,
    Telemetry,
    UploadAck,
    decode,
    encode,
)
from schemas.modelspec import forward
from schemas.types import F32

log = logging.getLogger(__name__)
_SEEN_TASKS = 256
_MAX_PACE_S = 3600.0


class EdgeAgent:
    """One device's agent. ``dataset`` is its local training data."""

    def __init__(
        self,
        settings: AgentSettings,
        probe: DeviceProbe,
        dataset: Dataset,
        trainer: Trainer | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        outbox: Outbox | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.dataset = dataset
        self.trainer: Trainer = trainer or make_trainer(settings.trainer)
        self.stats = AgentStats()
        self._http = http
        self._owns_http = http is None
        if outbox is None:
            if settings.durable and settings.state_dir is not None:
                outbox = FileOutbox(settings.state_dir)
            else:
                outbox = MemoryOutbox()
        self.outbox = outbox
        self._rng = rng or random.Random(zlib.crc32(settings.device_id.encode()) ^ settings.seed)
        self._models: ModelClient | None = None
        self._mqtt = DeviceSession(
            settings,
            self._rng,
            on_connect=self._on_connect,
            on_message=self._on_message,
            loops=[self._telemetry_loop, self._resend_loop],
            on_error=self._on_session_error,
        )
        self._session: asyncio.Task[None] | None = None
        self._work: asyncio.Task[None] | None = None
        self._current: Task | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._started = False
        self._closed = False
        self._resumed = False
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._last_sent: dict[str, float] = {}
        self._pace_until = 0.0
        self._seq = 0
        self._model: VerifiedModel | None = None
        self._onnx: OnnxModel | None = None
        self._onnx_version = -1
        self.on_event: Callable[[str, Any], None] | None = None  # test/simulator hook

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the HTTP client and launch the MQTT session (idempotent)."""
        if self._started:
            return
        self._started = True
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.settings.http_timeout_s)
        s = self.settings
        cache = s.state_dir / "models" if s.durable and s.state_dir is not None else None
        self._models = ModelClient(
            self._http,
            s.api_url,
            cache_dir=cache,
            public_key_hex=s.public_key_hex,
            max_bytes=s.max_model_bytes,
        )
        self._session = asyncio.create_task(
            self._mqtt.run(self._stopping), name=f"agent:{s.device_id}"
        )

    async def stop(self) -> None:
        """Abort training, publish ``offline``, disconnect, close owned clients (idempotent)."""
        if not self._started or self._closed:
            return
        self._closed = True
        work, task = self._work, self._current
        if work is not None and not work.done():
            await cancel_all([work])
            if task is not None:
                self.outbox.remove_task(task.task_id)
                await self._respond(task, "aborted", "shutdown")
        self._stopping.set()
        if self._session is not None:
            await asyncio.gather(self._session, return_exceptions=True)
        await cancel_all(list(self._bg))
        if self._owns_http and self._http is not None:
            await self._http.aclose()

    async def run(self) -> None:
        """Start (if needed) and run until ``stop()`` is called."""
        await self.start()
        await self._stopping.wait()
        if self._session is not None:
            await asyncio.gather(self._session, return_exceptions=True)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            _warn(f"unclosed EdgeAgent {self.settings.device_id}", ResourceWarning, stacklevel=1)

    async def __aenter__(self) -> EdgeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._mqtt.connected.wait(), timeout)

    @property
    def connected(self) -> bool:
        return self._mqtt.connected.is_set()

    @property
    def busy(self) -> bool:
        return self._work is not None and not self._work.done()

    # ----------------------------------------------------------------- MQTT session

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        self.stats.connects += 1
        self._emit("connected", None)
        if not self._resumed:
            self._resumed = True
            await self._resume_tasks()

    async def _on_message(self, leaf: str, payload: bytes) -> None:
        if leaf == "task":
            await self._on_task(payload)
        elif leaf == "ack":
            self._on_ack(payload)
        elif leaf == "pace":
            self._on_pace(payload)

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        if await self._mqtt.publish(topic, payload, qos, retain):
            self.stats.bytes_sent += len(payload)
            return True
        return False

    # ----------------------------------------------------------------- telemetry

    def telemetry(self, reading: ProbeReading | None = None) -> Telemetry:
        r = reading or self.probe.read()
        self._seq += 1
        return Telemetry(
            device_id=self.settings.device_id,
            ts=time.time(),
            battery=r.battery,
            charging=r.charging,
            network=r.network,
            metered=r.metered,
            bandwidth_kbps=r.bandwidth_kbps,
            rtt_ms=r.rtt_ms,
            idle=r.idle and not self.busy,
            agent_version=self.settings.agent_version,
            seq=self._seq,
        )

    async def _telemetry_loop(self, client: aiomqtt.Client) -> None:
        interval = self.settings.telemetry_interval_s
        while self._mqtt.client is client:
            if await self._publish(self.settings.topic("telemetry"), encode(self.telemetry()), 0):
                self.stats.telemetry_sent += 1
            wait = interval * self._rng.uniform(0.9, 1.1)
            wait = max(wait, self._pace_until - time.monotonic())
            await asyncio.sleep(wait)

    def _on_pace(self, payload: bytes) -> None:
        try:
            pace = decode(payload, Pace)
        except SchemaError as exc:
            self._count_error(f"pace_{exc.reason}")
            return
        if pace.device_id != self.settings.device_id:
            self._count_error("pace_device_id")
            return
        self.stats.paced += 1
        self._pace_until = time.monotonic() + min(pace.retry_after_s, _MAX_PACE_S)

    # ----------------------------------------------------------------- tasks

    async def _respond(self, task: Task, status: str, reason: str = "") -> None:
        msg = TaskResponse(
            task_id=task.task_id,
            device_id=self.settings.device_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            ts=time.time(),
        )
        await self._publish(self.settings.topic("task_status"), encode(msg), 1)
        self._emit(status, (task.task_id, reason))

    async def _on_task(self, payload: bytes) -> None:
        self.stats.tasks_received += 1
        try:
            task = decode(payload, Task)
        except SchemaError as exc:
            self.stats.tasks_invalid += 1
            self._count_error(f"task_{exc.reason}")
            log.warning("%s: invalid task: %s", self.settings.device_id, exc)
            return
        if task.device_id != self.settings.device_id:
            self.stats.tasks_invalid += 1
            self._count_error("task_device_id")
            return
        if task.task_id in self._seen or task.task_id in self.outbox:
            self.stats.tasks_duplicate += 1  # redelivery: never train twice for one task
            if task.task_id in self.outbox:
                await self._resend_one(task.task_id)
            return
        self._seen[task.task_id] = None
        while len(self._seen) > _SEEN_TASKS:
            self._seen.popitem(last=False)
        reason = self._decline_reason(task)
        if reason is not None:
            self.stats.tasks_declined += 1
            await self._respond(task, "declined", reason)
            return
        self.stats.tasks_accepted += 1
        self.outbox.put_task(task.task_id, payload)  # survives a crash during training
        await self._respond(task, "accepted")
        self._begin(task)

    def _begin(self, task: Task) -> None:
        self._current = task
        self._work = asyncio.create_task(self._execute(task, self.probe.read()))

    async def _resume_tasks(self) -> None:
        """After a crash: finish tasks that were accepted but had no update yet."""
        for task_id, payload in self.outbox.pending_tasks():
            try:
                task = decode(payload, Task)
            except SchemaError:
                self.outbox.remove_task(task_id)
                continue
            self._seen[task.task_id] = None
            if task.task_id in self.outbox:
                self.outbox.remove_task(task_id)  # update already built
                continue
            reason = self._decline_reason(task)
            if reason is not None:
                self.outbox.remove_task(task_id)
                self.stats.tasks_aborted += 1
                await self._respond(task, "aborted", f"resume:{reason}")
                continue
            self.stats.tasks_resumed += 1
            self._begin(task)

    def _decline_reason(self, task: Task) -> str | None:
        if task.deadline_ts <= time.time():
            return "expired"
        if self.busy:
            return "busy"
        if self.settings.model_name and task.model_name != self.settings.model_name:
            return "model"
        r = self.probe.read()
        return gate_reason(r, min_battery=task.min_battery, allow_metered=task.allow_metered)

    async def _execute(self, task: Task, start: ProbeReading) -> None:
        try:
            enc = await self._train_and_encode(task, start)
        except Aborted as exc:
            self.stats.tasks_aborted += 1
            self._current = None
            self.outbox.remove_task(task.task_id)
            await self._respond(task, "aborted", exc.reason)
            return
        except asyncio.CancelledError:
            self.stats.tasks_aborted += 1
            raise
        except Exception as exc:  # trainer/codec bug or bad data: abort, never crash
            self.stats.tasks_aborted += 1
            self._current = None
            self._count_error("train_internal")
            self.outbox.remove_task(task.task_id)
            log.exception("%s: task %s failed", self.settings.device_id, task.task_id)
            await self._respond(task, "aborted", f"error:{type(exc).__name__}")
            return
        update, data = enc.update, encode(enc.update)
        self.outbox.put(update.update_id, data)  # first: an accepted update is never lost
        crash_point(self.settings, "after_outbox")
        self.outbox.save_residual(task.job_id, enc.residual)
        self.outbox.remove_task(task.task_id)
        crash_point(self.settings, "before_publish")
        self.stats.tasks_completed += 1
        self._current = None
        self._emit("completed", update.update_id)
        await self._resend_one(update.update_id, data)

    async def _train_and_encode(self, task: Task, start: ProbeReading) -> Encoded:
        model = await self._pull(task.model_name, abort=True)
        return await train_and_encode(
            task,
            model,
            start,
            trainer=self.trainer,
            dataset=self.dataset,
            probe=self.probe,
            settings=self.settings,
            residual=self.outbox.load_residual(task.job_id) if task.codec.error_feedback else None,
        )

    # ----------------------------------------------------------------- outbox

    async def _resend_one(self, update_id: str, data: bytes | None = None) -> None:
        if data is None:
            data = dict(self.outbox.pending()).get(update_id)
            if data is None:
                return
        if await self._publish(self.settings.topic("update"), data, 1):
            self.stats.updates_sent += 1
            self._last_sent[update_id] = time.monotonic()

    async def _resend_loop(self, client: aiomqtt.Client) -> None:
        period = self.settings.resend_interval_s
        first = True
        while self._mqtt.client is client:
            now = time.monotonic()
            for update_id, data in self.outbox.pending():
                if first or now - self._last_sent.get(update_id, -1e18) >= period:
                    await self._resend_one(update_id, data)
            first = False
            await asyncio.sleep(period * self._rng.uniform(0.5, 1.0))

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = decode(payload, UploadAck)
        except SchemaError as exc:
            self._count_error(f"ack_{exc.reason}")
            return
        if ack.update_id not in self.outbox:
            self.stats.acks_stale += 1
            return
        self.outbox.remove(ack.update_id)
        self._last_sent.pop(ack.update_id, None)
        if ack.status == "rejected":
            self.stats.updates_rejected += 1
            log.warning(
                "%s: update %s rejected: %s", self.settings.device_id, ack.update_id, ack.reason
            )
        else:
            self.stats.updates_acked += 1
        self._emit(f"ack_{ack.status}", ack.update_id)

    # ----------------------------------------------------------------- models & inference

    async def _pull(self, name: str, *, abort: bool = False) -> VerifiedModel:
        assert self._models is not None, "agent not started"
        try:
            model = await self._models.pull(name)
        except AgentError as exc:
            self.stats.model_errors += 1
            self._count_error(f"model_{exc.reason}")
            log.warning("%s: model pull failed: %s", self.settings.device_id, exc)
            if abort:
                raise Aborted(f"model_{exc.reason}") from None
            raise
        self.stats.model_pulls += 1
        prev = self._model
        self._model = model
        new_version = prev is None or prev.manifest.version != model.manifest.version
        if self.settings.inference and new_version:
            t = asyncio.create_task(self._refresh_onnx(name, model.manifest.version))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)
        return model

    async def _refresh_onnx(self, name: str, version: int) -> None:
        assert self._models is not None
        try:
            art = await self._models.onnx(name, version)
            if art.version != self._onnx_version:
                onnx_model = await asyncio.to_thread(OnnxModel.load, art.data)
                self._onnx, self._onnx_version = onnx_model, art.version  # hot swap
                self.stats.onnx_swaps += 1
                self._emit("onnx", art.version)
        except AgentError as exc:
            self.stats.model_errors += 1
            self._count_error(f"onnx_{exc.reason}")
            log.warning("%s: ONNX pull failed: %s", self.settings.device_id, exc)

    async def refresh_model(self, name: str | None = None) -> int:
        """Pull and verify the latest model (and ONNX artifact); return its version."""
        await self.start()
        name = name or self.settings.model_name
        if not name:
            raise NoModelError("no_model_name", "no model name configured")
        model = await self._pull(name)
        if self.settings.inference:
            await self._refresh_onnx(name, model.manifest.version)
        return model.manifest.version

    @property
    def model_version(self) -> int | None:
        return None if self._model is None else self._model.manifest.version

    def predict(self, x: npt.ArrayLike) -> F32:
        """Logits for ``x[n, n_features]`` from the latest verified model.

        Uses onnxruntime when a verified ONNX artifact is loaded, else the numpy reference
        forward pass on the verified weights.
        """
        arr = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if self._onnx is not None:
            return self._onnx.run(arr)
        if self._model is not None:
            return forward(self._model.manifest.spec, self._model.params, arr)
        raise NoModelError("no_model", "no verified model loaded yet")

    # ----------------------------------------------------------------- misc

    def _on_session_error(self, reason: str) -> None:
        if reason == "mqtt":
            self.stats.disconnects += 1
        self._count_error(reason)

    def _count_error(self, reason: str) -> None:
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1

    def _emit(self, event: str, data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, data)
            except Exception:
                log.exception("on_event hook failed")
