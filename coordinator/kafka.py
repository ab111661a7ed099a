"""Thin aiokafka helpers: idempotent producer, consumers, topic creation."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from coordinator.errors import CoordinatorError
from coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)


def make_producer(s: CoordinatorSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **s.kafka_kwargs(),
        acks="all",
        enable_idempotence=True,
        client_id=f"{s.client_id}-producer",
        max_request_size=80 << 20,
        linger_ms=2,
    )


async def start_consumer(s: CoordinatorSettings, topic: str, group: str) -> AIOKafkaConsumer:
    """A started group consumer of ``topic``. The subscription is made after ``start`` so
    starting never waits for the group to settle (aiokafka's ``start`` blocks until a
    first assignment when topics are given up front, and a rebalance that waits on a
    departed member can hold that for minutes); the loop that reads it gets its
    partitions whenever the group assigns them."""
    c = make_consumer(s, group)
    await c.start()
    c.subscribe([topic])
    return c


async def stop_quietly(c: AIOKafkaConsumer | AIOKafkaProducer, timeout_s: float = 30.0) -> None:
    """Stop a client, bounded: a broker that no longer answers (LeaveGroup timing out)
    must not hold a coordinator's shutdown."""
    try:
        await asyncio.wait_for(c.stop(), timeout_s)
    except (TimeoutError, KafkaError) as exc:
        log.warning("kafka client did not stop cleanly: %r", exc)


def make_consumer(s: CoordinatorSettings, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **s.kafka_kwargs(),
        group_id=group,
        client_id=f"{s.client_id}-{group}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=80 << 20,
        max_partition_fetch_bytes=80 << 20,
        # a topic created just before the group formed may be missing from the first
        # metadata (an empty assignment): look again every few seconds, not every 5 min
        metadata_max_age_ms=5000,
    )


async def wait_for_topics(producer: AIOKafkaProducer, topics: list[str], timeout_s: float) -> None:
    """Return once the cluster's metadata lists every topic (freshly created ones take a
    moment to get leaders); a ``CoordinatorError`` after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            for topic in topics:
                await producer.partitions_for(topic)
    except TimeoutError:
        raise CoordinatorError(
            "kafka", f"topics {topics} not available after {timeout_s:g}s"
        ) from None


async def group_members(s: CoordinatorSettings, group: str, timeout_s: float = 5.0) -> int:
    """How many consumers are live members of ``group`` (0 for an empty or unknown group).
    A ``CoordinatorError`` when the cluster does not answer within ``timeout_s``."""
    admin = AIOKafkaAdminClient(**s.kafka_kwargs(), client_id=s.client_id)
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            responses = await admin.describe_consumer_groups([group])
    except (TimeoutError, KafkaError, OSError) as exc:
        raise CoordinatorError("kafka", f"could not describe group {group!r}: {exc!r}") from None
    finally:
        await admin.close()
    members = 0
    for resp in responses:
        for g in resp.groups:  # (error_code, group_id, state, protocol_type, protocol, members)
            if g[1] == group and g[2] not in ("Dead", "Empty"):
                members += len(g[5])
    return members


async def ensure_topics(s: CoordinatorSettings) -> None:
    """Create the seven topics if missing (existing topics are left as they are), with
    replication factor min(3, brokers) and, at 3, ``min.insync.replicas`` 2."""
    admin = AIOKafkaAdminClient(**s.kafka_kwargs(), client_id=s.client_id)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # replicated on a cluster (3 copies, writes need 2 of them with acks=all), so one
        # broker may die without losing an acknowledged record; 1 copy on a single broker
        rf = min(3, len((await admin.describe_cluster())["brokers"]) or 1)
        isr = {"min.insync.replicas": "2"} if rf >= 3 else {}
        compact = {"cleanup.policy": "compact", **isr}
        big = {"max.message.bytes": str(80 << 20), **isr}
        wanted = [
            NewTopic(s.jobs_topic, 1, rf, topic_configs=compact),
            NewTopic(s.journal_topic, 1, rf, topic_configs=compact),
            NewTopic(s.credentials_topic, 1, rf, topic_configs=compact),
            NewTopic(s.tasks_topic, s.task_partitions, rf, topic_configs=isr),
            NewTopic(s.updates_topic, s.max_shards, rf, topic_configs=big),
            NewTopic(s.models_topic, 1, rf, topic_configs=big),
            NewTopic(s.artifacts_topic, 1, rf, topic_configs=compact),
        ]
        todo = [t for t in wanted if t.name not in existing]
        if todo:
            try:
                await admin.create_topics(todo)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
