"""Per-device rate limits at the coordinator: token buckets in process memory.

A device's messages are checked *before* they are decoded or cost any Redis work
(``Router.handle``; ``limit_uploads`` for ``POST /v1/uploads``), keyed by the device id
the transport vouches for (the MQTT topic; the broker confines a device to its own
topics). Two classes (``DeviceLimits.CLASSES``):

- ``telemetry``: ``telemetry`` and ``status`` (fleet state; the batcher coalesces the rest);
- ``upload``: ``update``, ``task_status`` and ``report`` (each costs Redis round trips in
  the ingest path, an update also a codec check and Kafka).

A message over its device's limit is dropped and counted in
``fedfleet_coord_rejected_total{reason="rate_limited"}``; an update is answered
``UploadAck(status="rejected", reason="rate_limited")``.

Why in process and not in Redis: a shared bucket would cost a Redis round trip per
message, the very per-message work a flood must not cause. Several coordinators split a
device's shared-subscription messages between them (and HTTP uploads go to whichever one
a balancer picks), so each limits its share: a device gets at most N x the rate through
N coordinators (``status`` is not shared: each coordinator sees all of it). A restart
starts every bucket full.

Memory: a bucket that has refilled to full is the same as no bucket, so such buckets are
dropped whenever the table doubles; the table holds only devices heard from within the
last ``burst / rate`` seconds (4 s for telemetry by default).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

from coordinator.metrics import CoordinatorMetrics
from coordinator.settings import CoordinatorSettings
from schemas.messages import Update, UploadAck

RATE_LIMITED = "rate_limited"  # the reason label and the UploadAck reason
_MIN_PRUNE = 10_000


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst``; a message
    takes one token. ``rate <= 0``: no limit. Pure: the caller passes the clock."""

    __slots__ = ("_b", "_prune_at", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._b: dict[str, list[float]] = {}  # key -> [tokens, at]
        self._prune_at = _MIN_PRUNE

    def __len__(self) -> int:
        return len(self._b)

    def allow(self, key: str, now: float) -> bool:
        """Take a token from ``key``'s bucket; False (nothing taken) if it has none."""
        if self.rate <= 0:
            return True
        b = self._b.get(key)
        if b is None:
            self._b[key] = [self.burst - 1.0, now]
            if len(self._b) > self._prune_at:
                self._prune(now)
            return True
        tokens = min(self.burst, b[0] + max(0.0, now - b[1]) * self.rate)
        b[1] = max(b[1], now)
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        """Drop the buckets that are full again (the same as a fresh one)."""
        need = self.burst
        rate = self.rate
        self._b = {k: b for k, b in self._b.items() if b[0] + (now - b[1]) * rate < need}
        self._prune_at = max(_MIN_PRUNE, 2 * len(self._b))


class DeviceLimits:
    """The coordinator's per-device limits, one ``TokenBuckets`` per message class."""

    CLASSES: ClassVar[dict[str, str]] = {
        "telemetry": "telemetry", "status": "telemetry",
        "update": "upload", "task_status": "upload", "report": "upload",
    }  # fmt: skip

    def __init__(
        self,
        *,
        telemetry_rate: float,
        telemetry_burst: float,
        upload_rate: float,
        upload_burst: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buckets = {
            "telemetry": TokenBuckets(telemetry_rate, telemetry_burst),
            "upload": TokenBuckets(upload_rate, upload_burst),
        }
        self.clock = clock

    @classmethod
    def from_settings(cls, s: CoordinatorSettings) -> DeviceLimits:
        return cls(telemetry_rate=s.telemetry_rate_per_s, telemetry_burst=s.telemetry_burst,
                   upload_rate=s.upload_rate_per_s, upload_burst=s.upload_burst)  # fmt: skip

    def allow(self, leaf: str, device_id: str) -> bool:
        """May ``device_id`` send one more message on its ``leaf`` topic now?"""
        cls = self.CLASSES.get(leaf)
        if cls is None:
            return True
        return self.buckets[cls].allow(device_id, self.clock())


def rate_limited_ack(upd: Update) -> UploadAck:
    return UploadAck(update_id=upd.update_id, task_id=upd.task_id, status="rejected",
                     reason=RATE_LIMITED)  # fmt: skip


def limit_uploads(
    upload: Callable[[Update], Awaitable[UploadAck]],
    limits: DeviceLimits,
    metrics: CoordinatorMetrics,
) -> Callable[[Update], Awaitable[UploadAck]]:
    """``POST /v1/uploads`` behind the same per-device upload limit as MQTT uploads."""

    async def limited(upd: Update) -> UploadAck:
        if not limits.allow("update", upd.device_id):
            metrics.rejected.labels(source="update", reason=RATE_LIMITED).inc()
            metrics.uploads.labels(status="rejected").inc()
            return rate_limited_ack(upd)
        return await upload(upd)

    return limited
