"""``Uploader``: delivers the outbox — publish, re-send un-acked updates, handle acks.

An update stays in the outbox until an ``UploadAck`` (accepted, duplicate or rejected)
arrives; while connected, ``resend_loop`` re-publishes every pending update once per
connection and then each ``resend_interval_s`` (the server dedupes by ``update_id``).

Two transports, one outbox: updates of at least ``http_upload_min_bytes`` go over HTTP
(``POST {api_url}/v1/uploads``, whose answer is the ack itself), smaller ones over MQTT,
and while MQTT is down every update goes over HTTP (``offline_loop``). Either way the
server's token, dedupe and ack-after-Kafka rules are the same (``coordinator.uploads``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from edge_agent.outbox import Outbox
from edge_agent.settings import AgentSettings
from edge_agent.stats import AgentStats
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, Update, UploadAck, decode, encode

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[bool]]
MSGPACK = "application/msgpack"


class HttpUploads:
    """``POST {api_url}/v1/uploads`` on the agent's HTTP client (opened by the agent)."""

    def __init__(self, settings: AgentSettings, stats: AgentStats) -> None:
        self.url = settings.api_url.rstrip("/") + "/v1/uploads"
        self.stats = stats
        self._http: httpx.AsyncClient | None = None
        # the device's own credential (a coordinator with require_enrolment checks it)
        self.headers = {"Content-Type": MSGPACK}
        if settings.mqtt_username:
            pair = f"{settings.mqtt_username}:{settings.mqtt_password}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()

    def open(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def post(self, data: bytes) -> bytes | None:
        """The ``UploadAck`` the server answered (MessagePack), or None: not delivered
        (unreachable, 5xx, 401: a credential the server does not take now), to be sent again
        later. A body the server can never take (403: it names another device than the
        credential, 413, 422) is answered with a local ``rejected`` ack, so it leaves the
        outbox."""
        if self._http is None:
            return None
        try:
            r = await self._http.post(self.url, content=data, headers=self.headers)
        except httpx.HTTPError as exc:
            self.stats.count_error("http_upload_unreachable")
            log.debug("http upload failed: %r", exc)
            return None
        if r.status_code == 200:
            return r.content
        if r.status_code in (403, 413, 422):
            self.stats.count_error(f"http_upload_{r.status_code}")
            try:
                upd = decode_update_ids(data)
            except SchemaError:
                return None
            detail = _detail(r)
            return encode(UploadAck(update_id=upd[0], task_id=upd[1], status="rejected",
                                    reason=f"http_{r.status_code}: {detail}"[:200]))  # fmt: skip
        self.stats.count_error(f"http_upload_{r.status_code}")
        return None


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", ""))
    except ValueError:
        return r.text[:120]


def decode_update_ids(data: bytes) -> tuple[str, str]:
    """``(update_id, task_id)`` of an encoded ``Update`` (the outbox holds valid ones)."""
    upd = decode(data, Update, max_bytes=UPDATE_MAX_BYTES)
    return upd.update_id, upd.task_id


def _no_event(_event: str, _data: Any) -> None:
    return None


# rejections that are not about the update: keep it and send it again later
RETRY_LATER = frozenset({"rate_limited"})


class Uploader:
    def __init__(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        stats: AgentStats,
        publish: Publish,
        *,
        rng: random.Random | None = None,
        emit: Callable[[str, Any], None] = _no_event,
        http: HttpUploads | None = None,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.stats = stats
        self.publish = publish
        self.rng = rng or random.Random()
        self.emit = emit
        self.http = http if settings.http_uploads else None
        self.connected = connected
        self.last_sent: dict[str, float] = {}  # update_id -> monotonic time of last publish

    def _over_http(self, data: bytes) -> bool:
        if self.http is None:
            return False
        return len(data) >= self.settings.http_upload_min_bytes or not self.connected()

    async def send(self, update_id: str, data: bytes | None = None) -> None:
        """Send one pending update (``data`` or read from the outbox) over HTTP or MQTT."""
        if data is None:
            data = dict(self.outbox.pending()).get(update_id)
            if data is None:
                return
        if self._over_http(data):
            assert self.http is not None
            ack = await self.http.post(data)
            if ack is not None:
                self.stats.updates_sent += 1
                self.stats.updates_sent_http += 1
                self.stats.update_bytes += len(data)
                self.last_sent[update_id] = time.monotonic()
                self.on_ack(ack)
                return
            if not self.connected():
                return  # offline_loop tries again
        if await self.publish(self.settings.topic("update"), data, 1):
            self.stats.updates_sent += 1
            self.stats.update_bytes += len(data)
            self.last_sent[update_id] = time.monotonic()

    async def offline_loop(self) -> None:
        """While MQTT is down, send what is pending over HTTP every ``resend_interval_s``
        (an update built while offline is sent at once by ``send``)."""
        period = self.settings.resend_interval_s
        while True:
            await asyncio.sleep(period * self.rng.uniform(0.5, 1.0))
            if self.http is None or self.connected():
                continue
            now = time.monotonic()
            for update_id, data in self.outbox.pending():
                if now - self.last_sent.get(update_id, -1e18) >= period:
                    await self.send(update_id, data)

    async def resend_loop(self) -> None:
        """Per connection: re-send everything pending now, then what is due every period."""
        period = self.settings.resend_interval_s
        first = True
        while True:
            now = time.monotonic()
            for update_id, data in self.outbox.pending():
                if first or now - self.last_sent.get(update_id, -1e18) >= period:
                    await self.send(update_id, data)
            first = False
            await asyncio.sleep(period * self.rng.uniform(0.5, 1.0))

    def on_ack(self, payload: bytes) -> None:
        try:
            ack = decode(payload, UploadAck)
        except SchemaError as exc:
            self.stats.count_error(f"ack_{exc.reason}")
            return
        if ack.update_id not in self.outbox:
            self.stats.acks_stale += 1
            return
        if ack.status == "rejected" and ack.reason in RETRY_LATER:
            # the coordinator throttled this device: the update stays in the outbox and
            # the resend loop offers it again after ``resend_interval_s``
            self.stats.count_error(f"upload_{ack.reason}")
            return
        self.outbox.remove(ack.update_id)
        self.last_sent.pop(ack.update_id, None)
        if ack.status == "rejected":
            self.stats.updates_rejected += 1
            log.warning(
                "%s: update %s rejected: %s", self.settings.device_id, ack.update_id, ack.reason
            )
        else:
            self.stats.updates_acked += 1
        self.emit(f"ack_{ack.status}", ack.update_id)
