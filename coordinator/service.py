"""The coordinator service: the I/O shell around ``coordinator.core`` in one AsyncExitStack.

    async with Coordinator(CoordinatorSettings.from_env()) as coord:
        print(coord.rest_url)
        await coord.wait_closed()

Loops (each supervised: an unexpected error is counted, logged and the loop restarted):
fleet-link ingest (``FleetLink.serve``, reconnecting), telemetry flusher, fleet sweep
(``FleetStore.sweep``: devices past ``device_ttl_s`` leave the fleet), selector,
dispatcher (``fl.tasks`` -> the link; only with the default Kafka task sink), registry
(``fl.models``), and uvicorn serving ``coordinator.api``. The link and the task sink are
ports: ``Coordinator(s, link=MemoryFleetLink(), task_sink=DirectTaskSink)`` runs without
an MQTT broker and without ``fl.tasks``; a test that drives one part by hand builds only
that part with ``coordinator.core.build_core``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import uvicorn

from coordinator.api import AppState, create_app
from coordinator.artifacts import DiskCache, KafkaArtifacts
from coordinator.broker_admin import BrokerAdmin, DynsecBrokerAdmin
from coordinator.broker_passwd import PasswdBrokerAdmin
from coordinator.core import build_core
from coordinator.cred_journal import (
    KafkaCredentialJournal,
    journal_unrecorded_credentials,
    restore_lost_credentials,
)
from coordinator.dispatcher import run_dispatcher
from coordinator.errors import CoordinatorError
from coordinator.fleet import run_sweep
from coordinator.jobs import Job
from coordinator.journal import (
    KafkaJobJournal,
    journal_unrecorded_jobs,
    restore_lost_jobs,
    run_recovery,
)
from coordinator.kafka import (
    ensure_topics,
    make_producer,
    start_consumer,
    stop_quietly,
    wait_for_topics,
)
from coordinator.lifecycle import set_spec, set_status
from coordinator.link import FleetLink
from coordinator.metrics import CoordinatorMetrics, default_metrics
from coordinator.mqtt_link import MqttFleetLink
from coordinator.multi_link import MultiFleetLink
from coordinator.ratelimit import limit_uploads
from coordinator.redis_client import redis_client
from coordinator.settings import CoordinatorSettings
from coordinator.task_sink import KafkaTaskSink, TaskSink, TaskSinkFactory
from coordinator.tasks import load_task_key
from coordinator.uploads import replying
from schemas.aio import cancel_all, cancelling
from schemas.messages import JobSpec, ModelSpecMsg, encode
from schemas.mqtt_auth import MqttCredentials

log = logging.getLogger(__name__)


class Coordinator:
    """Async context manager; ``start``/``stop`` are idempotent."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        metrics: CoordinatorMetrics | None = None,
        link: FleetLink | None = None,
        task_sink: TaskSinkFactory | None = None,
        broker_admin: BrokerAdmin | None = None,
    ) -> None:
        """``link``: the device link (default: ``MqttFleetLink`` on ``settings``' broker).
        ``task_sink``: builds where leased tasks go (default: ``fl.tasks`` on Kafka plus
        the dispatcher loop that pushes them over the link; ``DirectTaskSink`` pushes them
        over the link at once, with no dispatcher). ``broker_admin``: the broker's credential
        store for enrolment (default: the dynamic-security plugin of ``settings``' broker
        when the coordinator has a broker credential, else none)."""
        self.settings = settings
        self.metrics = metrics or default_metrics()
        creds = settings.mqtt_credentials()
        self.link: FleetLink = link or fleet_link(settings, creds)
        # the store the coordinator opens itself it also closes; an injected one its owner
        self._own_admin: DynsecBrokerAdmin | PasswdBrokerAdmin | None = None
        if broker_admin is None and creds is not None:
            broker_admin = self._own_admin = broker_admin_for(settings, creds)
        self.broker_admin = broker_admin
        self._task_sink_factory = task_sink
        self._stack: AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._rest_url = ""
        self._pending: set[asyncio.Task[Any]] = set()
        self._upload_slots = asyncio.Semaphore(settings.upload_concurrency)
        self.redis: Any = None
        self.producer: Any = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def rest_url(self) -> str:
        if not self._rest_url:
            raise CoordinatorError("not_started", "coordinator is not running")
        return self._rest_url

    @property
    def started(self) -> bool:
        return self._stack is not None

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._stack is not None:
            return
        s = self.settings
        stack = AsyncExitStack()
        try:
            await self._start(stack, s)
        except BaseException:
            await self._cancel_tasks()
            await stack.aclose()
            raise
        self._stack = stack
        self._closed.clear()

    async def _start(self, stack: AsyncExitStack, s: CoordinatorSettings) -> None:
        # bind the REST port first: a port in use or an unroutable host fails at once
        rest_sock = bind_rest(s.http_host, s.http_port)
        stack.callback(rest_sock.close)
        self.redis = redis_client(s.redis_url)
        stack.push_async_callback(self.redis.aclose)
        await self.redis.ping()
        await ensure_topics(s)
        self.producer = make_producer(s)
        await self.producer.start()
        stack.push_async_callback(stop_quietly, self.producer)
        await wait_for_topics(self.producer, [s.jobs_topic, s.journal_topic, s.tasks_topic,
                                              s.updates_topic, s.models_topic,
                                              s.credentials_topic], 30)  # fmt: skip

        if s.admin_token in ("", "change-me"):
            log.warning("admin_token is the default: set FEDFLEET_ADMIN_TOKEN")
        if s.require_enrolment and self.broker_admin is None:
            log.warning("require_enrolment is on but this coordinator has no broker credential "
                        "store (mqtt_username/mqtt_password_file/mqtt_cafile): no device can "
                        "enrol, so every device's telemetry will be refused")  # fmt: skip
        task_key = load_task_key(s.task_key_path)  # upload tokens: shared by all coordinators
        if self._task_sink_factory is None:
            sink: TaskSink = KafkaTaskSink(self.producer, s.tasks_topic)
        else:
            sink = self._task_sink_factory(self.publish, self.metrics, task_key)
        # the job journal: read to its end, then Redis is made to agree with it before
        # anything is served (a Redis that came back empty or rolled back gets its jobs)
        self.journal = KafkaJobJournal(s, self.producer)
        await self.journal.start()
        stack.push_async_callback(self.journal.stop)
        # the credential journal likewise: an enrolled fleet survives a Redis wipe
        self.credentials = KafkaCredentialJournal(s, self.producer)
        await self.credentials.start()
        stack.push_async_callback(self.credentials.stop)
        # onnx jobs' artifacts: durable on Kafka, cached next to the model store
        self.artifacts = KafkaArtifacts(s.kafka_kwargs(), s.artifacts_topic,
                                        DiskCache(s.model_store_dir / "artifacts"),
                                        self.producer, client_id=s.client_id)  # fmt: skip
        core = build_core(s, self.redis, metrics=self.metrics, producer=self.producer,
                          task_sink=sink, publish=self.publish, fail_job=self.fail_job,
                          complete_job=self.complete_job, write_spec=self.write_spec,
                          artifacts=self.artifacts,
                          broker_admin=self.broker_admin, task_key=task_key,
                          credentials=self.credentials)  # fmt: skip
        if self._own_admin is not None:
            stack.push_async_callback(self._own_admin.close)
        self.core = core
        self.signer, self.registry, self.fleet, self.tasks = (
            core.signer, core.registry, core.fleet, core.tasks)  # fmt: skip
        self.jobs, self.stats, self.rounds, self.batcher = (
            core.jobs, core.stats, core.rounds, core.batcher)  # fmt: skip
        self.selector, self.uploads, self.router = core.selector, core.uploads, core.router
        await journal_unrecorded_jobs(self.journal, self.jobs)
        await restore_lost_jobs(self.journal, self.jobs, self.metrics)
        creds = core.enroller.store
        await journal_unrecorded_credentials(self.credentials, creds)
        await restore_lost_credentials(self.credentials, creds, self.metrics)
        await self._fetch_artifacts()

        self._spawn("telemetry", self.batcher.run)
        self._spawn("mqtt", lambda: self.link.serve(self._on_message))
        await self.link.wait_ready(30)
        if isinstance(sink, KafkaTaskSink):  # fl.tasks -> the link
            consumer = await start_consumer(s, s.tasks_topic, f"{s.topic_prefix}coord-dispatcher")
            stack.push_async_callback(stop_quietly, consumer)
            self._spawn("dispatcher", lambda: run_dispatcher(consumer, self.publish, self.metrics,
                                                             task_key))  # fmt: skip
        mconsumer = await start_consumer(s, s.models_topic, f"{s.topic_prefix}coord-registry")
        stack.push_async_callback(stop_quietly, mconsumer)
        self._spawn("registry", lambda: self._registry_loop(mconsumer))
        self._spawn("selector", self.selector.run)
        self._spawn("journal", self.journal.run)
        self._spawn("credentials", self.credentials.run)
        self._spawn("fleet-sweep", lambda: run_sweep(self.fleet, s.device_sweep_s, self.metrics))
        self._spawn("recovery", lambda: run_recovery([
            lambda: restore_lost_jobs(self.journal, self.jobs, self.metrics),
            lambda: restore_lost_credentials(self.credentials, creds, self.metrics),
        ], s.recovery_check_s))  # fmt: skip
        stack.push_async_callback(self._cancel_tasks)

        upload = replying(core.uploads, self._upload_slots)
        if core.router.limits is not None:  # HTTP uploads share the per-device upload limit
            upload = limit_uploads(upload, core.router.limits, self.metrics)
        self.app_state = AppState(
            settings=s, fleet=self.fleet, jobs=self.jobs, tasks=self.tasks, stats=self.stats,
            registry=self.registry, signer=self.signer, metrics=self.metrics,
            publish_job=self.publish_job, ready=self._ready, journal=self.journal,
            evals=core.evals, upload=upload,
            artifacts=self.artifacts, enroller=core.enroller,
        )  # fmt: skip
        self.app = create_app(self.app_state)
        tls: dict[str, Any] = {}
        if s.tls_certfile is not None and s.tls_keyfile is not None:
            tls = {"ssl_certfile": str(s.tls_certfile), "ssl_keyfile": str(s.tls_keyfile)}
        config = uvicorn.Config(
            self.app,
            host=s.http_host,
            port=s.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            **tls,
        )
        if tls:
            try:
                config.load()  # the TLS context now: a bad certificate fails the start
            except (OSError, ssl.SSLError) as exc:
                raise CoordinatorError("tls", f"cannot serve HTTPS with {s.tls_certfile}: "
                                              f"{exc}") from None  # fmt: skip
            assert config.ssl is not None
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._server = server
        serve = asyncio.create_task(server.serve(sockets=[rest_sock]), name="coord-uvicorn")

        async def _stop_server() -> None:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(serve, 10)

        stack.push_async_callback(_stop_server)
        while not server.started:
            if serve.done():
                serve.result()
                raise CoordinatorError("http", "uvicorn exited at startup")
            await asyncio.sleep(0.01)
        sock = server.servers[0].sockets[0].getsockname()
        self._rest_url = f"{'https' if tls else 'http'}://{sock[0]}:{sock[1]}"

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            await stack.aclose()
        finally:
            self._rest_url = ""
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ------------------------------------------------------------------ helpers
    def _spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(
            asyncio.create_task(supervise(name, factory, self.metrics), name=f"coord-{name}")
        )

    async def _cancel_tasks(self) -> None:
        tasks = self._tasks + list(self._pending)
        self._tasks = []
        await cancel_all(tasks)
        with contextlib.suppress(Exception):
            await self.batcher.flush()

    async def _ready(self) -> bool:
        return self.link.ready()

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish to a device over the link (waits up to 10 s for a lost session)."""
        await self.link.publish(topic, payload, qos)

    async def _fetch_artifacts(self) -> None:
        """Every recorded onnx job's artifact into the local cache (a fresh coordinator,
        or one whose disk was lost, reads them from Kafka): its registry builds version 0
        and every export from it."""
        for _, job in self.journal.latest().values():
            if job.spec.spec.family != "onnx":
                continue
            try:
                await self.artifacts.get(job.spec.spec.artifact)
            except Exception:
                self.metrics.errors.labels(loop="artifacts").inc()
                log.warning("job %s: artifact %s not readable", job.spec.job_id,
                            job.spec.spec.artifact, exc_info=True)  # fmt: skip

    async def fail_job(self, job_id: str, reason: str) -> None:
        """End a running job with ``reason`` (journal, Redis, ``fl.jobs``)."""
        if (await self.jobs.get(job_id)).spec.status != "running":
            return
        await set_status(job_id, "failed", reason, journal=self.journal, jobs=self.jobs,
                         publish_job=self.publish_job)  # fmt: skip

    async def write_spec(self, job_id: str, model: ModelSpecMsg) -> None:
        """A standardize job's statistics fixed its input standardisation: record the new
        model spec (journal, Redis, ``fl.jobs``); training tasks start on the next pass."""
        await set_spec(job_id, model, journal=self.journal, jobs=self.jobs,
                       publish_job=self.publish_job)  # fmt: skip

    async def complete_job(self, job: Job, reason: str) -> None:
        """A stop condition held: pin the job's newest version (what ``latest`` serves from
        now on) and end it ``completed`` with ``reason``."""
        name = job.spec.model_name

        def pin() -> int | None:
            v = self.registry.newest_version(name)
            if v is None or self.registry.manifest(name, v).job_id != job.spec.job_id:
                return None
            self.registry.rollback(name, v)
            return v

        version = await asyncio.to_thread(pin)
        log.info("job %s completed (%s); final version %s pinned", job.spec.job_id, reason,
                 version)  # fmt: skip
        await set_status(job.spec.job_id, "completed", reason, journal=self.journal,
                         jobs=self.jobs, publish_job=self.publish_job)  # fmt: skip

    async def publish_job(self, spec: JobSpec) -> None:
        await self.producer.send_and_wait(
            self.settings.jobs_topic, value=encode(spec), key=spec.job_id.encode()
        )

    # ------------------------------------------------------------------ loops
    async def _on_message(self, topic: str, payload: bytes) -> None:
        """One device message from the link. Uploads run concurrently (bounded: each waits
        for Kafka acks); everything else in arrival order."""
        if topic.endswith("/update"):
            await self._upload_slots.acquire()
            t = asyncio.create_task(self._guarded(topic, payload))
            t.add_done_callback(lambda _t: self._upload_slots.release())
            self._pending.add(t)
            t.add_done_callback(self._pending.discard)
        else:
            await self._guarded(topic, payload)

    async def _guarded(self, topic: str, payload: bytes) -> None:
        try:
            await self.router.handle(topic, payload)
        except Exception:
            self.metrics.errors.labels(loop="ingest").inc()
            log.exception("ingest of %s failed", topic)

    async def _registry_loop(self, consumer: Any) -> None:
        async for rec in consumer:
            await self.core.apply_shard_version(rec.value or b"")
            await consumer.commit()

    async def apply_shard_version(self, value: bytes) -> int | None:
        return await self.core.apply_shard_version(value)


def fleet_link(s: CoordinatorSettings, creds: MqttCredentials | None) -> FleetLink:
    """The device link the settings name: one ``MqttFleetLink`` on the broker, or a
    ``MultiFleetLink`` over one per broker of ``mqtt_brokers``."""
    links = [MqttFleetLink(b.host, b.port, credentials=creds,
                           client_id=s.client_id if i == 0 else f"{s.client_id}-b{i}",
                           share_group=s.share_group, topic_root=s.mqtt_topic_root)
             for i, b in enumerate(s.brokers)]  # fmt: skip
    return links[0] if len(links) == 1 else MultiFleetLink(links)


def broker_admin_for(
    s: CoordinatorSettings, creds: MqttCredentials
) -> DynsecBrokerAdmin | PasswdBrokerAdmin:
    """The broker's credential store the settings name: its password file (shared by every
    broker, each one reloaded and probed), else dynsec (one broker only: each plugin
    keeps its own store)."""
    brokers = [(b.host, b.port) for b in s.brokers]
    if s.mqtt_passwd_file is not None and s.mqtt_broker_pidfile is not None:
        return PasswdBrokerAdmin(s.mqtt_passwd_file, s.mqtt_broker_pidfile, brokers[0][0],
                                 brokers[0][1], creds.cafile, brokers=brokers)  # fmt: skip
    if len(brokers) > 1:
        raise CoordinatorError("mqtt", "several brokers share one credential store only as "
                               "a password file: set mqtt_passwd_file and "
                               "mqtt_broker_pidfile (the dynsec plugin keeps one per broker)")
    return DynsecBrokerAdmin(*brokers[0], creds, topic_root=s.mqtt_topic_root)


async def supervise(
    name: str, factory: Callable[[], Awaitable[None]], metrics: CoordinatorMetrics
) -> None:
    """Run a loop until it returns; an unexpected error is counted, logged and the loop
    restarted with backoff. A loop that fails while it is being cancelled (a client's
    shutdown raising its own error) stops: cancelling always ends it."""
    delay = 0.1
    while True:
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if cancelling():
                raise asyncio.CancelledError from None
            metrics.errors.labels(loop=name).inc()
            log.exception("coordinator loop %s failed; restarting", name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def bind_rest(host: str, port: int) -> socket.socket:
    """The REST listening socket; any failure is a one-line ``CoordinatorError``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
            sock.listen(2048)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except (OSError, OverflowError) as exc:
        raise CoordinatorError("http_bind", f"cannot serve REST on {host}:{port}: {exc}") from None
    return sock


async def run_forever(settings: CoordinatorSettings) -> None:
    """Entry point for ``fedfleet coordinator``."""
    async with Coordinator(settings) as coord:
        log.info("coordinator REST at %s", coord.rest_url)
        started = time.time()
        await coord.wait_closed()
        log.info("coordinator stopped after %.0fs", time.time() - started)
