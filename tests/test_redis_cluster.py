"""The coordinator on a real three-master Redis Cluster (``stack.redis_cluster``).

The coordinator's store tests run on it through the ``redis_url`` fixture
(``tests/test_coordinator_support.py``): every test that takes ``redis_url`` runs once on
a single redis-server (``[redis]``) and once on the session's cluster (``[cluster]``,
the ``redis_cluster`` fixture of ``tests/conftest.py``) — the fleet, task, job, round,
job-stats, evaluation, statistics, lock and enrolment stores, the ingest and upload paths
and the REST API over them. Here: the cluster itself, the key layout's slots, and the
cluster-wide SCAN of the load tests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot

from coordinator.fleet import FleetStore
from coordinator.keys import Keys, slot_tag
from coordinator.redis_client import cluster_url, redis_client
from coordinator.tasks import TaskStore
from schemas.messages import Telemetry
from stack.redis_cluster import RedisCluster, slot_ranges


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_slot_ranges_cover_every_slot_once() -> None:
    assert slot_ranges(3) == [(0, 5460), (5461, 10921), (10922, 16383)]
    assert slot_ranges(1) == [(0, 16383)]


def test_every_key_but_enrolment_hashes_to_the_deployments_slot() -> None:
    # Prepare: every key name Keys makes, for one job, task and device
    k = Keys("ff:fl.")
    working = [k.device("d1"), k.selt, k.sels, k.seen, k.lastseen, k.contrib,
               k.history("d1"), k.job("job-1"), k.jobs, k.task("t-abc-01"), k.leases("job-1"),
               k.round("job-1"), k.jobstats("job-1"), k.holds("job-1"),
               k.side_leases("job-1"), k.evals("job-1"), k.evaluation("job-1", 3),
               k.eval_devices("job-1", 3), k.ending, k.fedstats("job-1"),
               k.fedstats_devices("job-1"), k.selector_lock,
               k.device_prefix + "d2", k.history("") + "d2", k.task("") + "t-x"]  # fmt: skip
    enrol = [k.enrol_token("ab"), k.credential("d1"), k.enrolled, k.cred_checks]
    # Assert: one slot each; the prefix starts every key (ACL ~ff:fl.*)
    assert {slot(x) for x in working} == {slot("{ff:fl.}")}
    assert {slot(x) for x in enrol} == {slot("{enrol}")}
    assert all(x.startswith("ff:fl.") for x in working + enrol)
    # two deployments (topic prefixes) on one cluster spread over slots
    assert slot(Keys("ff:a.").selt) != slot(Keys("ff:b.").selt)


def test_a_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        slot_tag("ff:{x}.")


def test_cluster_urls_open_a_cluster_client() -> None:
    assert cluster_url("redis+cluster://127.0.0.1:7000") == "redis://127.0.0.1:7000"
    assert cluster_url("rediss+cluster://h:1") == "rediss://h:1"
    assert cluster_url("redis://127.0.0.1:6379/0") is None


async def test_the_cluster_has_three_masters_and_every_slot(redis_cluster: RedisCluster) -> None:
    r = redis_client(redis_cluster.url)
    try:
        assert isinstance(r, AsyncRedisCluster)
        await r.ping()
        assert len(r.get_primaries()) == 3
        info: Any = await r.cluster_info(target_nodes=AsyncRedisCluster.PRIMARIES)
        for node_info in info.values():
            assert node_info["cluster_state"] == "ok"
            assert int(node_info["cluster_slots_assigned"]) == 16384
            assert int(node_info["cluster_size"]) == 3
    finally:
        await r.aclose()


async def test_fleet_state_lives_on_the_primary_that_owns_its_slot(
    redis_cluster: RedisCluster, unique_prefix: str
) -> None:
    # Prepare: a fleet of three devices written through the store
    r = redis_client(redis_cluster.url)
    k = Keys(unique_prefix)
    fleet = FleetStore(r, unique_prefix, 60.0)
    try:
        now = time.time()
        await fleet.write_telemetry(
            [Telemetry(device_id=f"d{i}", ts=now, battery=80.0, charging=True,
                       network="wifi", metered=False) for i in range(3)], now)  # fmt: skip
        # Assert: every key of it sits in the deployment's slot, on the node owning it
        s = slot(k.selt)
        owner = r.get_node_from_key(k.selt)
        got = await r.execute_command("CLUSTER", "GETKEYSINSLOT", s, 100, target_nodes=owner)
        assert set(got) == {k.device(f"d{i}") for i in range(3)} | {
            k.selt, k.contrib, k.seen, k.lastseen}
        assert await fleet.count() == 3
    finally:
        await r.aclose()


async def test_the_load_tests_scan_task_records_across_the_cluster(
    redis_cluster: RedisCluster, unique_prefix: str
) -> None:
    from loadtest.churn import task_records

    r = redis_client(redis_cluster.url)
    tasks = TaskStore(r, unique_prefix)
    try:
        now = time.time()
        for i in range(5):
            await tasks.create(task_id=f"t-{i}", job_id="job-a" if i < 3 else "job-b",
                               device_id=f"d{i}", token="tok", issued_ts=now,
                               deadline_ts=now + 60)  # fmt: skip
        recs = await task_records(r, unique_prefix, "job-a")
        assert sorted(h["task_id"] for h in recs) == ["t-0", "t-1", "t-2"]
    finally:
        await r.aclose()


def test_a_stopped_cluster_comes_back_with_its_data(tmp_path: Path) -> None:
    # Prepare: a cluster of its own (the session's one stays up), one key per master
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        cluster.wait_ready()
        keys = [f"{{k{i}}}" for i in range(30)]

        async def write() -> None:
            r = redis_client(cluster.url)
            for key in keys:
                await r.set(key, key)
            await r.aclose()

        async def read() -> list[Any]:
            r = redis_client(cluster.url)
            try:
                return [await r.get(key) for key in keys]
            finally:
                await r.aclose()

        asyncio.run(write())
        assert len({slot(x) * 3 // 16384 for x in keys}) == 3  # the keys span all masters
        # Act: stop every node, start them again on their ports and directories
        cluster.stop()
        cluster.start()
        cluster.wait_ready()
        # Assert: the append-only files brought every key back
        assert asyncio.run(read()) == keys
    finally:
        cluster.stop()
