"""Per-device token buckets (``coordinator.ratelimit``): pure, the clock is passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.ratelimit import DeviceLimits, TokenBuckets, limit_uploads
from coordinator.settings import CoordinatorSettings
from schemas.messages import Update, UpdateChunk, UploadAck


def test_a_burst_then_one_token_per_interval() -> None:
    b = TokenBuckets(rate=2.0, burst=3)
    assert [b.allow("d", 100.0) for _ in range(4)] == [True, True, True, False]
    assert not b.allow("d", 100.4)  # 0.8 of a token
    assert b.allow("d", 100.5)  # 1.0
    assert not b.allow("d", 100.5)
    assert b.allow("other", 100.5)  # buckets are per key


def test_rate_zero_is_no_limit_and_a_clock_going_back_mints_nothing() -> None:
    free = TokenBuckets(rate=0.0, burst=1)
    assert all(free.allow("d", 0.0) for _ in range(1000)) and len(free) == 0
    b = TokenBuckets(rate=1.0, burst=1)
    assert b.allow("d", 50.0)
    assert not b.allow("d", 10.0)  # earlier than the last take: no refill
    assert not b.allow("d", 50.5)
    assert b.allow("d", 51.0)


@given(
    rate=st.floats(0.1, 50.0),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_the_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    b = TokenBuckets(rate=rate, burst=burst)
    t, allowed = 0.0, 0
    for g in gaps:
        t += g
        allowed += b.allow("d", t)
    assert allowed <= burst + rate * t + 1e-9


@given(interval=st.floats(0.5, 10.0), n=st.integers(1, 200))
def test_a_device_within_its_rate_is_never_refused(interval: float, n: int) -> None:
    """The defaults against the fastest conforming fleet: telemetry every 0.5 s (loadtest
    scale), jittered x0.9 by the agent."""
    s = CoordinatorSettings()
    b = TokenBuckets(rate=s.telemetry_rate_per_s, burst=s.telemetry_burst)
    assert all(b.allow("d", i * interval * 0.9) for i in range(n))


def test_full_buckets_are_dropped_when_the_table_doubles() -> None:
    b = TokenBuckets(rate=1.0, burst=2)
    for i in range(10_000):
        b.allow(f"g{i}", 0.0)  # 10,000 ids, one message each
    assert len(b) == 10_000
    b.allow("late", 5.0)  # the 10,001st key: a prune; every ghost's bucket is full again
    assert len(b) == 1
    assert b.allow("g1", 5.0) and b.allow("g1", 5.0) and not b.allow("g1", 5.0)


def test_device_limits_map_topic_leaves_to_two_classes() -> None:
    now = [0.0]
    lim = DeviceLimits(telemetry_rate=1.0, telemetry_burst=1, upload_rate=1.0, upload_burst=2,
                       clock=lambda: now[0])  # fmt: skip
    assert lim.allow("telemetry", "d") and not lim.allow("status", "d")  # one bucket
    assert lim.allow("update", "d") and lim.allow("task_status", "d")
    assert not lim.allow("report", "d")
    assert lim.allow("unknown-leaf", "d")
    now[0] = 1.0
    assert lim.allow("status", "d") and lim.allow("report", "d")


async def test_http_uploads_over_the_limit_are_refused_with_a_reason() -> None:
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    lim = DeviceLimits(telemetry_rate=1.0, telemetry_burst=1, upload_rate=0.001, upload_burst=1)
    seen: list[str] = []

    async def inner(upd: Update) -> UploadAck:
        seen.append(upd.update_id)
        return UploadAck(update_id=upd.update_id, task_id=upd.task_id, status="accepted")

    upload = limit_uploads(inner, lim, metrics)
    chunk = UpdateChunk(shard=0, start=0, stop=1, base_version=0, payload=b"x")
    upd = Update(update_id="u1", task_id="t1", job_id="j", device_id="d", upload_token="x",
                 num_samples=1, chunks=[chunk], sent_ts=1.0)  # fmt: skip
    assert (await upload(upd)).status == "accepted"
    ack = await upload(upd)
    assert (ack.status, ack.reason, ack.update_id) == ("rejected", "rate_limited", "u1")
    assert seen == ["u1"]
    assert counter_value(metrics.rejected, source="update", reason="rate_limited") == 1
