"""A job that names no ``shards`` gets one per live aggregator (issue "Jobs that run
themselves", ergonomics): the coordinator counts the members of the aggregators' consumer
group on the real Kafka broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aggregator.worker import AggregatorWorker
from coordinator.api.jobs import live_aggregators
from coordinator.kafka import group_members
from coordinator.settings import CoordinatorSettings
from tests.test_aggregator_kafka_support import create_topics, kafka_bootstrap, settings_for

__all__ = ["kafka_bootstrap"]  # fixture

pytestmark = pytest.mark.integration


async def _members(s: CoordinatorSettings, want: int) -> int:
    n = -1
    for _ in range(200):  # the group settles after a join (a rebalance); bounded wait
        n = await group_members(s, s.aggregator_group)
        if n == want:
            break
        await asyncio.sleep(0.1)
    return n


async def test_shards_default_to_the_live_aggregators(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    await create_topics(kafka_bootstrap, unique_prefix, 4)
    group = f"{unique_prefix}aggs"
    coord = CoordinatorSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=unique_prefix, aggregator_group=group,
        http_port=0,
    )  # fmt: skip
    assert await live_aggregators(coord) == 1  # nobody is in the group yet
    a = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path / "a"))
    b = settings_for(kafka_bootstrap, unique_prefix, str(tmp_path / "b"))
    async with AggregatorWorker(a), AggregatorWorker(b):
        assert await _members(coord, 2) == 2
        assert await live_aggregators(coord) == 2
    assert await _members(coord, 0) == 0
    assert await live_aggregators(coord) == 1


async def test_an_unreachable_kafka_gives_one_shard() -> None:
    s = CoordinatorSettings(kafka_bootstrap="127.0.0.1:1", http_port=0)
    assert await live_aggregators(s) == 1
