"""Kafka helpers the shard-worker integration tests share: topics, producing, reading the
announced versions, worker settings, the broker fixture and the reference run. (No tests.)

Set ``FEDFLEET_TEST_KAFKA=host:port`` to reuse a running broker instead of the ``stack``
fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import zstandard
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from aggregator.settings import AggregatorSettings
from schemas.messages import JobSpec, ShardUpdate, ShardVersion, decode, encode
from tests.reference import rules
from tests.reference.streams import init_slice, ref_stream

# ------------------------------------------------------------------ Kafka helpers


async def create_topics(bootstrap: str, prefix: str, shards: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(f"{prefix}jobs", 1, 1, topic_configs={"cleanup.policy": "compact"}),
                NewTopic(
                    f"{prefix}updates",
                    shards,
                    1,
                    topic_configs={"max.message.bytes": str(64 << 20)},
                ),
                NewTopic(
                    f"{prefix}models", 1, 1, topic_configs={"max.message.bytes": str(64 << 20)}
                ),
            ]
        )
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    prefix: str,
    *,
    jobs: Sequence[JobSpec] = (),
    updates: Sequence[ShardUpdate | tuple[int, bytes]] = (),
) -> None:
    """Produce jobs, then updates (a raw ``(partition, bytes)`` tuple for junk), in order."""
    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, max_request_size=64 << 20
    )
    await p.start()
    try:
        for j in jobs:
            await p.send_and_wait(f"{prefix}jobs", encode(j), key=j.job_id.encode())
        futs = []
        for u in updates:
            if isinstance(u, tuple):
                part, raw = u
                futs.append(await p.send(f"{prefix}updates", raw, partition=part))
            else:
                futs.append(
                    await p.send(
                        f"{prefix}updates", encode(u), partition=u.shard, key=u.update_id.encode()
                    )
                )
        for f in futs:
            await f
    finally:
        await p.stop()


async def read_models(bootstrap: str, prefix: str) -> list[ShardVersion]:
    """Every ShardVersion on ``{prefix}models`` so far."""
    tp = TopicPartition(f"{prefix}models", 0)
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=64 << 20,
    )
    await c.start()
    try:
        c.assign([tp])
        await c.seek_to_beginning(tp)
        end = (await c.end_offsets([tp]))[tp]
        out: list[ShardVersion] = []
        while await c.position(tp) < end:
            for rec in (await c.getmany(tp, timeout_ms=1000)).get(tp, []):
                out.append(decode(rec.value, ShardVersion, max_bytes=64 << 20))
        return out
    finally:
        await c.stop()


def slice_of(sv: ShardVersion) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(sv.params)
    return np.frombuffer(raw, dtype="<f4")


def settings_for(bootstrap: str, prefix: str, ckpt_dir: str, **kw: object) -> AggregatorSettings:
    base: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "group_id": f"{prefix}aggs",
        "checkpoint_dir": ckpt_dir,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "poll_timeout_ms": 100,
    }
    base.update(kw)
    return AggregatorSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    env = os.environ.get("FEDFLEET_TEST_KAFKA")
    if env:
        yield env
    else:
        yield request.getfixturevalue("stack").kafka_bootstrap


def ref_for(
    job: JobSpec,
    ups: list[ShardUpdate],
    shard: int,
    *,
    min_interval: float = 0.0,
    announced: list[int] | None = None,
) -> rules.RefResult:
    c = job.strategy
    return rules.fedasync(
        init_slice(job, shard),
        ref_stream(ups),
        alpha=c.alpha,
        staleness=c.staleness,
        a=c.staleness_a,
        b=c.staleness_b,
        keep_every=job.publish_every,
        history_size=None,  # a shard: every announced slice, no bound after the ack
        max_staleness=None,
        min_interval=min_interval,
        announced=announced,
    )
