"""The aggregator's Kafka clients, configured from its settings (one place)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from aggregator.settings import AggregatorSettings


def models_producer(s: AggregatorSettings) -> AIOKafkaProducer:
    """Idempotent, ``acks=all``: announcements on ``{prefix}models``."""
    return AIOKafkaProducer(
        **s.kafka_kwargs(),
        client_id=s.client_id,
        acks="all",
        enable_idempotence=True,
        max_request_size=s.max_message_bytes,
        linger_ms=5,
    )


def jobs_consumer(s: AggregatorSettings) -> AIOKafkaConsumer:
    """No group: ``{prefix}jobs`` is read whole, from the beginning, by every worker."""
    return AIOKafkaConsumer(
        **s.kafka_kwargs(),
        client_id=f"{s.client_id}-jobs",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


def updates_consumer(s: AggregatorSettings) -> AIOKafkaConsumer:
    """The consumer group on ``{prefix}updates`` (partition s = shard s); offsets are
    committed by hand, after the checkpoint that covers them."""
    fetch = s.max_update_bytes + (1 << 20)
    return AIOKafkaConsumer(
        **s.kafka_kwargs(),
        client_id=s.client_id,
        group_id=s.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=s.session_timeout_ms,
        heartbeat_interval_ms=s.heartbeat_interval_ms,
        max_partition_fetch_bytes=fetch,
        fetch_max_bytes=max(fetch, 52428800),
        max_poll_records=s.max_poll_records,
        isolation_level="read_committed",
    )
