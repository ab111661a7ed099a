"""``EdgeAgent``: MQTT session, telemetry, task execution, outbox and on-device inference.

Tasks: ``train`` (``execution.train_and_encode`` on the training rows, the update through the
outbox), ``eval`` and ``stats`` (``evaluation.build_report`` on the held-out / training rows
of ``holdout.split_holdout``, one ``EvalReport``/``StatsReport`` on ``fleet/{id}/report``,
never in the outbox).

Lifecycle (aiokafka-style): ``start()``/``stop()`` are idempotent, ``async with`` calls them,
``await agent.run()`` blocks until ``stop()``. The session with the broker is a
``DeviceLink`` (default ``MqttLink``; last will = retained ``offline`` status) that
reconnects with exponential backoff and jitter; a task in progress and the outbox survive
reconnects. Collaborators, each injectable: the link, the ``Uploader`` (outbox re-send,
acks), the ``ModelStore`` (pull, verify, ONNX swap, predict), the ``ComputePacer``
(simulated compute time) and the ``CrashPoints`` (tests). See ``docs/edge_agent.md``.
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

import httpx
import numpy.typing as npt

from edge_agent.crash import CrashPoints
from edge_agent.credentials import https_verify
from edge_agent.data import Dataset, data_abort_reason
from edge_agent.errors import Aborted, AgentError, DataError, NoModelError, TrainerUnavailable
from edge_agent.evaluation import build_report, publish_until
from edge_agent.execution import Encoded, check, train_and_encode
from edge_agent.gate import gate_reason
from edge_agent.holdout import split_holdout
from edge_agent.link import DeviceLink, LinkCallbacks, LinkConfig, Message
from edge_agent.model_cache import ModelCache, ModelStore
from edge_agent.models import VerifiedModel
from edge_agent.mqtt_link import MqttLink
from edge_agent.onnx_trainer import OnnxTorchTrainer
from edge_agent.outbox import FileOutbox, MemoryOutbox, Outbox
from edge_agent.pacing import ComputePacer, RealCompute
from edge_agent.probe import DeviceProbe, ProbeReading
from edge_agent.settings import AgentSettings
from edge_agent.stats import AgentStats
from edge_agent.trainer_factory import ArtifactTrainer, make_trainer
from edge_agent.trainers import Trainer
from edge_agent.uploader import HttpUploads, Uploader
from schemas.aio import cancel_all
from schemas.errors import SchemaError
from schemas.messages import (
    DeviceStatus,
    EvalReport,
    Pace,
    StatsReport,
    Task,
    TaskResponse,
    Telemetry,
    decode,
    encode,
)
from schemas.types import F32

log = logging.getLogger(__name__)
_SEEN_TASKS = 256
_MAX_PACE_S = 3600.0


def agent_link_config(settings: AgentSettings) -> LinkConfig:
    """The agent's session: its topics, retained online/offline status and last will."""
    s = settings
    status_topic = s.topic("status")

    def status(state: str, reason: str = "") -> Message:
        msg = DeviceStatus(
            device_id=s.device_id,
            state=state,  # type: ignore[arg-type]
            ts=time.time(),
            reason=reason,
        )
        return Message(status_topic, encode(msg), 1, True)

    return LinkConfig(
        client_id=f"fedfleet-agent-{s.device_id}",
        subscriptions=((s.topic("task"), 1), (s.topic("ack"), 1), (s.topic("pace"), 0)),
        will=lambda: status("offline", "lost"),
        hello=lambda: status("online"),
        farewell=lambda: status("offline", "shutdown"),
        keepalive_s=s.mqtt_keepalive_s,
        reconnect_min_s=s.reconnect_min_s,
        reconnect_max_s=s.reconnect_max_s,
        persistent=True,  # QoS 1 tasks/acks queued while we are away
    )


def http_client(settings: AgentSettings) -> httpx.AsyncClient:
    """The agent's HTTP client (model pulls, HTTP uploads): the coordinator's certificate
    verified against ``api_cafile`` when set, else the system's trust store."""
    verify = https_verify(settings.api_cafile, "api_cafile")
    return httpx.AsyncClient(timeout=settings.http_timeout_s, verify=verify)


def agent_rng(settings: AgentSettings) -> random.Random:
    """The agent's default random source (jitter of telemetry, re-sends, reconnects)."""
    return random.Random(zlib.crc32(settings.device_id.encode()) ^ settings.seed)


def mqtt_link(settings: AgentSettings, rng: random.Random | None = None) -> MqttLink:
    """The default link: aiomqtt to ``settings.mqtt_host:mqtt_port``, then the
    ``mqtt_failover`` brokers in order when it cannot connect (``schemas.brokers``)."""
    s = settings
    return MqttLink(
        agent_link_config(s),
        host=s.mqtt_host,
        port=s.mqtt_port,
        username=s.mqtt_username,
        password=s.mqtt_password,
        cafile=s.mqtt_cafile,
        rng=rng,
        failover=s.failover_brokers,
    )


class EdgeAgent:
    """One device's agent. ``dataset`` is its local data: ``split`` cuts it into training
    rows and the held-out rows of ``eval`` tasks (``settings.eval_fraction``).

    ``link`` (default ``mqtt_link(settings)``), ``models`` (default ``ModelCache``),
    ``pacer`` (default ``RealCompute``: no simulated compute time) and ``crash`` (default
    ``CrashPoints()``: none) are collaborators a simulator or a test may inject or wrap;
    ``uploader`` is built on the agent's outbox and stats.
    """

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
        link: DeviceLink | None = None,
        models: ModelStore | None = None,
        crash: CrashPoints | None = None,
        pacer: ComputePacer | None = None,
        data_problem: DataError | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.dataset = dataset
        self.split = split_holdout(dataset, settings.eval_fraction, settings.device_id)
        # data that could not be loaded: the agent still runs and aborts every task with
        # this reason, so the coordinator shows it (a device with no usable data is visible)
        self.data_problem = data_problem
        self.trainer: Trainer = trainer or make_trainer(settings.trainer)
        self._onnx_trainer: OnnxTorchTrainer | None = None  # onnx jobs (built on first use)
        self.stats = AgentStats()
        self._http = http
        self._owns_http = http is None
        if outbox is None:
            if settings.durable and settings.state_dir is not None:
                outbox = FileOutbox(settings.state_dir)
            else:
                outbox = MemoryOutbox()
        self.outbox = outbox
        self._rng = rng or agent_rng(settings)
        self.models: ModelStore = models or ModelCache(settings)
        self.crash = crash or CrashPoints()
        self.pacer: ComputePacer = pacer or RealCompute()
        self.link: DeviceLink = link or mqtt_link(settings, self._rng)
        self._http_uploads = HttpUploads(settings, self.stats)
        self.uploader = Uploader(
            settings, self.outbox, self.stats, self._publish, rng=self._rng, emit=self._emit,
            http=self._http_uploads, connected=lambda: self.link.connected,
        )  # fmt: skip
        self.link.bind(
            LinkCallbacks(
                on_connect=self._on_connect,
                on_message=self._on_message,
                loops=(self._telemetry_loop, self.uploader.resend_loop),
                on_error=self._on_session_error,
            )
        )
        self._work: asyncio.Task[None] | None = None
        self._current: Task | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._started = False
        self._closed = False
        self._resumed = False
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pace_until = 0.0
        self._seq = 0
        self.on_event: Callable[[str, Any], None] | None = None  # test/simulator hook

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the HTTP client and start the link (idempotent)."""
        if self._started:
            return
        self._started = True
        if self._http is None:
            self._http = http_client(self.settings)
        self.models.open(self._http)
        self._http_uploads.open(self._http)
        await self.link.start()
        if self.uploader.http is not None:  # MQTT down: pending updates go over HTTP
            t = asyncio.create_task(self.uploader.offline_loop(), name="agent-offline-uploads")
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    async def stop(self) -> None:
        """Abort training, publish ``offline``, disconnect, close owned clients (idempotent)."""
        if not self._started or self._closed:
            return
        self._closed = True
        work, task = self._work, self._current
        try:
            if work is not None and not work.done():
                await cancel_all([work])
                if task is not None:
                    self.outbox.remove_task(task.task_id)
                    await self._respond(task, "aborted", "shutdown")
        finally:  # even when this stop is cancelled: never leave the session running
            self._stopping.set()
            await self.link.stop()
            await cancel_all(list(self._bg))
            if self._owns_http and self._http is not None:
                await self._http.aclose()

    async def run(self) -> None:
        """Start (if needed) and run until ``stop()`` is called."""
        await self.start()
        await self._stopping.wait()
        await self.link.stop()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            _warn(f"unclosed EdgeAgent {self.settings.device_id}", ResourceWarning, stacklevel=1)

    async def __aenter__(self) -> EdgeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.link.wait_connected(timeout)

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def busy(self) -> bool:
        return self._work is not None and not self._work.done()

    # ----------------------------------------------------------------- MQTT session

    async def _on_connect(self) -> None:
        self.stats.connects += 1
        self._emit("connected", None)
        if not self._resumed:
            self._resumed = True
            await self._resume_tasks()

    async def _on_message(self, message: Message) -> None:
        leaf, payload = message.leaf, message.payload
        if leaf == "task":
            await self._on_task(payload)
        elif leaf == "ack":
            self.uploader.on_ack(payload)
        elif leaf == "pace":
            self._on_pace(payload)

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        if await self.link.publish(topic, payload, qos, retain):
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

    async def _telemetry_loop(self) -> None:
        interval = self.settings.telemetry_interval_s
        while self.link.connected:
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
                await self.uploader.send(task.task_id)
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
        if task.task_kind == "train":  # eval/stats are cheap: a crash loses them, no resume
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
        if not task.upload_token:  # the dispatcher fills it in; without one no upload counts
            return "no_token"
        if task.deadline_ts <= time.time():
            return "expired"
        if self.busy:
            return "busy"
        if self.settings.model_name and task.model_name != self.settings.model_name:
            return "model"
        r = self.probe.read()
        return gate_reason(r, min_battery=task.min_battery, allow_metered=task.allow_metered)

    async def _execute(self, task: Task, start: ProbeReading) -> None:
        result: Encoded | EvalReport | StatsReport
        try:
            if task.task_kind == "train":
                result = await self._train_and_encode(task, start)
            else:
                result = await self._report(task, start)
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
        if isinstance(result, Encoded):
            await self._deliver(task, result)
        else:
            await self._send_report(task, result)

    async def _deliver(self, task: Task, enc: Encoded) -> None:
        update, data = enc.update, encode(enc.update)
        self.outbox.put(update.update_id, data)  # first: an accepted update is never lost
        self.crash.hit("after_outbox")
        self.outbox.save_residual(task.job_id, enc.residual)
        self.outbox.remove_task(task.task_id)
        self.crash.hit("before_publish")
        self.stats.tasks_completed += 1
        self._current = None
        self._emit("completed", update.update_id)
        await self.uploader.send(update.update_id, data)

    async def _train_and_encode(self, task: Task, start: ProbeReading) -> Encoded:
        if self.data_problem is not None:
            raise Aborted(data_abort_reason(self.data_problem))
        model = await self._pull(task.model_name, abort=True)
        return await train_and_encode(
            task,
            model,
            start,
            trainer=self._trainer_for(model),
            dataset=self.split.train,
            probe=self.probe,
            settings=self.settings,
            residual=self.outbox.load_residual(task.job_id) if task.codec.error_feedback else None,
            crash=self.crash,
            pacer=self.pacer,
        )

    async def _report(self, task: Task, start: ProbeReading) -> EvalReport | StatsReport:
        if self.data_problem is not None:
            raise Aborted(data_abort_reason(self.data_problem))
        try:
            report = await build_report(
                task, models=self.models, split=self.split, device_id=self.settings.device_id
            )
        except Aborted:
            raise
        except AgentError as exc:  # model pull or verification
            raise self._model_failed(exc) from None
        self.stats.model_pulls += 1
        check(task, start, self.probe)  # the deadline and the gate, as for training
        return report

    async def _send_report(self, task: Task, report: EvalReport | StatsReport) -> None:
        self._current = None
        data, topic = encode(report), self.settings.topic("report")
        if await publish_until(lambda: self._publish(topic, data, 1), self.link, task.deadline_ts):
            self.stats.reports_sent += 1
            self._emit("reported", (task.task_id, task.task_kind))
        else:
            self.stats.reports_unsent += 1
            self._count_error("report_unsent")

    # ----------------------------------------------------------------- models & inference

    async def _pull(self, name: str, *, abort: bool = False) -> VerifiedModel:
        prev = self.models.version
        try:
            model = await self.models.pull(name)
        except AgentError as exc:
            aborted = self._model_failed(exc)
            if abort:
                raise aborted from None
            raise
        self.stats.model_pulls += 1
        new_version = prev is None or prev != model.manifest.version
        if self.settings.inference and new_version:
            t = asyncio.create_task(self._refresh_onnx(name, model.manifest.version))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)
        return model

    def _trainer_for(self, model: VerifiedModel) -> Trainer:
        """The built-in trainer, or PyTorch on the job's artifact for an ``onnx`` job."""
        if model.manifest.spec.family != "onnx":
            return self.trainer
        if model.artifact is None:
            raise Aborted("model_artifact")
        if self._onnx_trainer is None:
            try:
                self._onnx_trainer = OnnxTorchTrainer()
            except TrainerUnavailable as exc:  # no PyTorch on this device
                raise Aborted(f"trainer_unavailable:{exc.reason}") from None
        return ArtifactTrainer(self._onnx_trainer, model.artifact)

    def _model_failed(self, exc: AgentError) -> Aborted:
        """Count a failed model pull; the abort it means for a task."""
        self.stats.model_errors += 1
        self._count_error(f"model_{exc.reason}")
        log.warning("%s: model pull failed: %s", self.settings.device_id, exc)
        return Aborted(f"model_{exc.reason}")

    async def _refresh_onnx(self, name: str, version: int) -> None:
        try:
            swapped = await self.models.refresh_onnx(name, version)
            if swapped is not None:
                self.stats.onnx_swaps += 1
                self._emit("onnx", swapped)
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
        return self.models.version

    def predict(self, x: npt.ArrayLike) -> F32:
        """Logits for ``x[n, n_features]`` from the latest verified model.

        Uses onnxruntime when a verified ONNX artifact is loaded, else the numpy reference
        forward pass on the verified weights.
        """
        return self.models.predict(x)

    # ----------------------------------------------------------------- misc

    def _on_session_error(self, reason: str) -> None:
        if reason in ("mqtt", "not_authorized"):
            self.stats.disconnects += 1
        self._count_error(reason)

    def _count_error(self, reason: str) -> None:
        self.stats.count_error(reason)

    def _emit(self, event: str, data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, data)
            except Exception:
                log.exception("on_event hook failed")
