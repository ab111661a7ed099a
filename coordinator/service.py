"""The coordinator service: every loop and the REST server composed in one AsyncExitStack.

    async with Coordinator(CoordinatorSettings.from_env()) as coord:
        print(coord.rest_url)
        await coord.wait_closed()

Loops (each supervised: an unexpected error is counted, logged and the loop restarted):
MQTT ingest (with reconnect), telemetry flusher, selector, dispatcher (``fl.tasks``),
registry (``fl.models``), and uvicorn serving ``coordinator.api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import aiomqtt
import uvicorn
from redis.asyncio import Redis

from coordinator.api import AppState, create_app
from coordinator.dispatcher import run_dispatcher
from coordinator.errors import CoordinatorError, NotFound
from coordinator.fleet import FleetStore
from coordinator.ingest import Router, TelemetryBatcher, subscriptions
from coordinator.jobs import Job, JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.kafka import ensure_topics, make_producer, start_consumer, stop_quietly
from coordinator.keys import Keys
from coordinator.lock import RedisLock
from coordinator.metrics import CoordinatorMetrics, default_metrics
from coordinator.registry import ModelRegistry
from coordinator.rounds import RoundStore
from coordinator.selector import Selector
from coordinator.settings import CoordinatorSettings
from coordinator.signing import Signer
from coordinator.tasks import TaskStore
from coordinator.uploads import UploadHandler
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, JobSpec, ShardVersion, decode, encode

log = logging.getLogger(__name__)


class Coordinator:
    """Async context manager; ``start``/``stop`` are idempotent."""

    def __init__(
        self, settings: CoordinatorSettings, *, metrics: CoordinatorMetrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or default_metrics()
        self._stack: AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._mqtt: aiomqtt.Client | None = None
        self._mqtt_up = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._rest_url = ""
        self._pending: set[asyncio.Task[Any]] = set()
        self._upload_slots = asyncio.Semaphore(settings.upload_concurrency)
        self._instance = secrets.token_hex(3)  # MQTT ids must differ per live session
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
        self.redis = Redis.from_url(s.redis_url, decode_responses=True)
        stack.push_async_callback(self.redis.aclose)
        await self.redis.ping()
        if s.create_topics:
            await ensure_topics(s)
        self.producer = make_producer(s)
        await self.producer.start()
        stack.push_async_callback(stop_quietly, self.producer)

        if s.admin_token in ("", "change-me"):
            log.warning("admin_token is the default: set FEDFLEET_ADMIN_TOKEN")
        self.signer = Signer.load_or_create(s.signing_key_path)
        self.registry = ModelRegistry(s.model_store_dir, self.signer, retention=s.retention)
        self.fleet = FleetStore(self.redis, s.key_prefix, s.telemetry_ttl_s)
        self.tasks = TaskStore(self.redis, s.key_prefix)
        self.jobs = JobStore(self.redis, s.key_prefix)
        self.stats = JobStatsStore(self.redis, s.key_prefix)
        self.rounds = RoundStore(self.redis, s.key_prefix)
        self.batcher = TelemetryBatcher(
            self.fleet, self.metrics, batch=s.telemetry_batch, interval_s=s.telemetry_flush_s
        )
        self.selector = Selector(
            settings=s,
            fleet=self.fleet,
            tasks=self.tasks,
            jobs=self.jobs,
            rounds=self.rounds,
            stats=self.stats,
            lock=RedisLock(self.redis, Keys(s.key_prefix).selector_lock),
            producer=self.producer,
            publish=self.publish,
            metrics=self.metrics,
            latest_versions=self.latest_shard_versions,
        )
        self.uploads = UploadHandler(
            tasks=self.tasks,
            jobs=self.jobs,
            fleet=self.fleet,
            stats=self.stats,
            producer=self.producer,
            updates_topic=s.updates_topic,
            publish=self.publish,
            metrics=self.metrics,
            on_uploaded=self.selector.wake,
            newest_versions=self.known_shard_versions,
        )
        self.router = Router(
            fleet=self.fleet,
            tasks=self.tasks,
            stats=self.stats,
            uploads=self.uploads,
            batcher=self.batcher,
            metrics=self.metrics,
        )

        self._spawn("telemetry", self.batcher.run)
        if s.run_mqtt:
            self._spawn("mqtt", self._mqtt_loop)
            await asyncio.wait_for(self._mqtt_up.wait(), 30)
        if s.run_dispatcher:
            consumer = await start_consumer(s, s.tasks_topic, f"{s.topic_prefix}coord-dispatcher")
            stack.push_async_callback(stop_quietly, consumer)
            self._spawn("dispatcher", lambda: run_dispatcher(consumer, self.publish, self.metrics))
        if s.run_registry:
            mconsumer = await start_consumer(s, s.models_topic, f"{s.topic_prefix}coord-registry")
            stack.push_async_callback(stop_quietly, mconsumer)
            self._spawn("registry", lambda: self._registry_loop(mconsumer))
        if s.run_selector:
            self._spawn("selector", self.selector.run)
        stack.push_async_callback(self._cancel_tasks)

        self.app_state = AppState(
            settings=s, fleet=self.fleet, jobs=self.jobs, tasks=self.tasks, stats=self.stats,
            registry=self.registry, signer=self.signer, metrics=self.metrics,
            publish_job=self.publish_job, ready=self._ready,
        )  # fmt: skip
        self.app = create_app(self.app_state)
        config = uvicorn.Config(
            self.app,
            host=s.http_host,
            port=s.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
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
        self._rest_url = f"http://{sock[0]}:{sock[1]}"

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
        async def supervised() -> None:
            delay = 0.1
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.metrics.errors.labels(loop=name).inc()
                    log.exception("coordinator loop %s failed; restarting", name)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        self._tasks.append(asyncio.create_task(supervised(), name=f"coord-{name}"))

    async def _cancel_tasks(self) -> None:
        tasks = self._tasks + list(self._pending)
        self._tasks = []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.batcher.flush()

    async def _ready(self) -> bool:
        return (not self.settings.run_mqtt) or self._mqtt_up.is_set()

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish over MQTT (waits up to 10 s for the session to come back)."""
        if not self.settings.run_mqtt:
            return
        await asyncio.wait_for(self._mqtt_up.wait(), 10)
        assert self._mqtt is not None
        await self._mqtt.publish(topic, payload, qos=qos)

    async def publish_job(self, spec: JobSpec) -> None:
        await self.producer.send_and_wait(
            self.settings.jobs_topic, value=encode(spec), key=spec.job_id.encode()
        )

    # ------------------------------------------------------------------ loops
    async def _mqtt_loop(self) -> None:
        s = self.settings
        delay = 0.2
        while True:
            try:
                async with aiomqtt.Client(
                    s.mqtt_host,
                    s.mqtt_port,
                    identifier=f"{s.client_id}-mqtt-{self._instance}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=30,
                    max_queued_incoming_messages=100_000,
                ) as client:
                    for flt, qos in subscriptions(s.share_group):
                        await client.subscribe(flt, qos=qos)
                    self._mqtt = client
                    self._mqtt_up.set()
                    delay = 0.2
                    async for msg in client.messages:
                        payload = msg.payload
                        data = payload if isinstance(payload, bytes | bytearray) else b""
                        topic = str(msg.topic)
                        if topic.endswith("/update"):
                            await self._upload_slots.acquire()  # bounded concurrency
                            t = asyncio.create_task(self._guarded(topic, bytes(data)))
                            t.add_done_callback(lambda _t: self._upload_slots.release())
                            self._pending.add(t)
                            t.add_done_callback(self._pending.discard)
                        else:
                            await self._guarded(topic, bytes(data))
            except aiomqtt.MqttError as exc:
                log.warning("MQTT session lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self._mqtt_up.clear()
                self._mqtt = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _guarded(self, topic: str, payload: bytes) -> None:
        try:
            await self.router.handle(topic, payload)
        except Exception:
            self.metrics.errors.labels(loop="ingest").inc()
            log.exception("ingest of %s failed", topic)

    async def _registry_loop(self, consumer: Any) -> None:
        async for rec in consumer:
            await self.apply_shard_version(rec.value or b"")
            await consumer.commit()

    async def latest_shard_versions(self, job: Job) -> list[int] | None:
        """Shard versions of ``job``'s newest published model (what ``/latest`` serves
        unless pinned); None when the newest version is not this job's or there is none.
        The model directory is shared, so every coordinator process sees the writer's."""

        def read() -> list[int] | None:
            name = job.spec.model_name
            v = self.registry.newest_version(name)
            if v is None:
                return None
            try:
                m = self.registry.manifest(name, v)
            except NotFound:  # pruned between the scan and the read
                return None
            return list(m.shard_versions) if m.job_id == job.spec.job_id else None

        return await asyncio.to_thread(read)

    async def known_shard_versions(self, spec: JobSpec) -> list[int] | None:
        """The newest version of each shard of ``spec`` this coordinator has assembled."""
        got = self.registry.cached_shard_versions(spec.job_id)
        if got is not None:
            return got
        return await asyncio.to_thread(self.registry.shard_versions, spec)

    async def apply_shard_version(self, value: bytes) -> int | None:
        """Fold one ``fl.models`` record in; returns the new global version, if any."""
        try:
            sv = decode(value, ShardVersion, max_bytes=UPDATE_MAX_BYTES)
            job = await self.jobs.get(sv.job_id)
            m = await asyncio.to_thread(self.registry.apply, job.spec, sv)
            shards = len(job.spec.shard_bounds) - 1
        except SchemaError as exc:
            self.metrics.rejected.labels(source="fl.models", reason=exc.reason).inc()
            return None
        except NotFound:
            self.metrics.rejected.labels(source="fl.models", reason="unknown_job").inc()
            return None
        except CoordinatorError as exc:
            self.metrics.rejected.labels(source="fl.models", reason=exc.code).inc()
            return None
        # per-shard figures (shard.{s}.*) and the job's updates_applied / mean staleness
        await self.stats.record_shard(sv, shards)
        if m is None:
            return None
        self.metrics.versions.inc()
        self.selector.wake(sv.job_id)  # a sync round may be waiting for this version
        return m.version


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
