"""``Uploader``: delivers the outbox — publish, re-send un-acked updates, handle acks.

An update stays in the outbox until an ``UploadAck`` (accepted, duplicate or rejected)
arrives; while connected, ``resend_loop`` re-publishes every pending update once per
connection and then each ``resend_interval_s`` (the server dedupes by ``update_id``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from edge_agent.outbox import Outbox
from edge_agent.settings import AgentSettings
from edge_agent.stats import AgentStats
from schemas.errors import SchemaError
from schemas.messages import UploadAck, decode

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[bool]]


def _no_event(_event: str, _data: Any) -> None:
    return None


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
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.stats = stats
        self.publish = publish
        self.rng = rng or random.Random()
        self.emit = emit
        self.last_sent: dict[str, float] = {}  # update_id -> monotonic time of last publish

    async def send(self, update_id: str, data: bytes | None = None) -> None:
        """Publish one pending update (``data`` or read from the outbox)."""
        if data is None:
            data = dict(self.outbox.pending()).get(update_id)
            if data is None:
                return
        if await self.publish(self.settings.topic("update"), data, 1):
            self.stats.updates_sent += 1
            self.last_sent[update_id] = time.monotonic()

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
