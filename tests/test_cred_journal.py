"""The credential journal (Kafka and in-memory, one contract) and recovery of device
credentials a Redis lost or rolled back: an enrolled fleet is let in again after a wipe."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from coordinator.broker_admin import MemoryBrokerAdmin
from coordinator.cred_journal import (
    KafkaCredentialJournal,
    MemoryCredentialJournal,
    StoredCredential,
    decode_record,
    encode_record,
    journal_unrecorded_credentials,
    restore_lost_credentials,
)
from coordinator.enrolment import Enroller, EnrolmentStore
from coordinator.errors import EnrolmentUnavailable
from coordinator.fleet import FleetStore
from coordinator.metrics import CoordinatorMetrics, counter_value
from tests import journal_rig as rig

pytestmark = pytest.mark.integration



def cred(device_id: str, **over: Any) -> StoredCredential:
    c = StoredCredential(device_id, "ab" * 32, 1_700_000_000.5, 0.0, 0)
    return replace(c, **over)


def journals(kind: str, stack: Any, prefix: str) -> Any:
    return rig.journals(kind, stack, prefix, memory=MemoryCredentialJournal,
                        kafka=KafkaCredentialJournal)


@pytest.fixture(params=["kafka", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_journal_keeps_the_newest_record_of_every_device_across_restarts(
    kind: str, stack: Any, unique_prefix: str
) -> None:
    async with journals(kind, stack, unique_prefix) as opener:
        async with opener() as j:
            assert j.latest() == {}
            a = await j.append(cred("dev-a"))
            await j.append(cred("dev-b"))
            revoked = await j.append(replace(a, revoked_ts=1_700_000_100.0))
            assert revoked.revision > a.revision > 0
            assert j.latest()["dev-a"] == revoked  # own writes are visible at once
        async with opener() as j2:  # a restarted coordinator reads it all back
            got = j2.latest()
            assert set(got) == {"dev-a", "dev-b"}
            assert got["dev-a"] == revoked and got["dev-b"].revoked_ts == 0.0


def test_a_record_round_trips_and_carries_no_password() -> None:
    c = cred("dev-a", revision=7, revoked_ts=3.5)
    value = encode_record(c)
    assert decode_record(value) == c
    assert b"secret_sha" in value and b"password" not in value


async def test_lost_and_rolled_back_credentials_are_restored_and_counted(
    stack: Any, unique_prefix: str
) -> None:
    r: Any = Redis.from_url(stack.redis_url, decode_responses=True)
    prefix = f"ff:{unique_prefix}"
    store = EnrolmentStore(r, prefix)
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    j = MemoryCredentialJournal()
    try:
        await store.record("old", "pw-old")  # in Redis from before the journal existed
        assert await journal_unrecorded_credentials(j, store) == ["old"]
        assert await journal_unrecorded_credentials(j, store) == []
        assert (await store.revisions(["old"]))["old"] == j.latest()["old"].revision
        new = await j.append(cred("new"))
        await store.put(new)
        assert await restore_lost_credentials(j, store, metrics) == []  # Redis agrees
        # Redis loses everything: both come back, valid, the password still checks
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        assert not await store.verify("old", "pw-old")
        assert sorted(await restore_lost_credentials(j, store, metrics)) == ["new", "old"]
        assert await store.verify("old", "pw-old")
        assert await store.enrolled(["old", "new", "other"]) == {"old", "new"}
        assert counter_value(metrics.credentials_restored) == 2
        # a rollback: Redis holds the device as enrolled, the journal has it revoked since
        await j.append(replace(j.latest()["old"], revoked_ts=1_700_000_200.0))
        assert await restore_lost_credentials(j, store, metrics) == ["old"]
        assert not await store.verify("old", "pw-old")
        assert await store.enrolled(["old", "new"]) == {"new"}
        assert await restore_lost_credentials(j, store, metrics) == []
    finally:
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        await r.aclose()


class _FailingJournal(MemoryCredentialJournal):
    async def append(self, cred: StoredCredential) -> StoredCredential:
        raise ConnectionError("kafka is down")


async def test_enrolment_and_revocation_are_journalled_and_survive_a_redis_wipe(
    stack: Any, unique_prefix: str
) -> None:
    r: Any = Redis.from_url(stack.redis_url, decode_responses=True)
    prefix = f"ff:{unique_prefix}"
    metrics = CoordinatorMetrics(CollectorRegistry())
    j = MemoryCredentialJournal()
    broker = MemoryBrokerAdmin()
    store = EnrolmentStore(r, prefix)
    enroller = Enroller(store, broker, FleetStore(r, prefix, 60.0), metrics, journal=j)
    try:
        (t1, t2), _ = await enroller.issue(2, 600)
        pw_a, _ = await enroller.enrol(t1, "dev-a")
        pw_b, _ = await enroller.enrol(t2, "dev-b")
        assert set(j.latest()) == {"dev-a", "dev-b"}
        await enroller.revoke("dev-b")
        assert j.latest()["dev-b"].revoked_ts > 0
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        await restore_lost_credentials(j, store, metrics)
        assert await store.verify("dev-a", pw_a)  # let in again after the wipe
        assert not await store.verify("dev-b", pw_b)  # and the revocation held
        assert await store.enrolled(["dev-a", "dev-b"]) == {"dev-a"}

        # the journal refuses: the device gets no password, the broker keeps none for it,
        # and the token can be used again once the journal is back
        enroller.journal = _FailingJournal()
        (t3,), _ = await enroller.issue(1, 600)
        with pytest.raises(EnrolmentUnavailable, match="journal"):
            await enroller.enrol(t3, "dev-c")
        assert not await broker.has_client("dev-c")
        assert await store.enrolled(["dev-c"]) == set()
        assert counter_value(metrics.enrolments, outcome="journal_error") == 1
        enroller.journal = j
        pw_c, _ = await enroller.enrol(t3, "dev-c")
        assert broker.accepts("dev-c", pw_c) and "dev-c" in j.latest()
    finally:
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        await r.aclose()


async def test_a_quiet_pass_compares_only_what_changed_and_a_wipe_everything(
    stack: Any, unique_prefix: str
) -> None:
    """With Redis intact since the last pass, only records read since then are compared
    (two round trips for a quiet fleet, not one per device); a wipe sets the check
    counter back and the next pass compares them all."""
    r: Any = Redis.from_url(stack.redis_url, decode_responses=True)
    prefix = f"ff:{unique_prefix}"
    store = EnrolmentStore(r, prefix)
    compared: list[list[str]] = []
    real = store.revisions

    async def counting(ids: list[str]) -> dict[str, int]:
        compared.append(sorted(ids))
        return await real(ids)

    store.revisions = counting  # type: ignore[method-assign,assignment]
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    j = MemoryCredentialJournal()
    try:
        for d in ("a", "b", "c"):
            await store.put(await j.append(cred(d)))
        assert await restore_lost_credentials(j, store, metrics) == []
        assert compared == [["a", "b", "c"]]  # the first pass: everything
        assert await restore_lost_credentials(j, store, metrics) == []
        assert compared[1:] == []  # quiet: nothing read per device
        await store.put(await j.append(cred("d")))
        assert await restore_lost_credentials(j, store, metrics) == []
        assert compared[1:] == [["d"]]
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        assert sorted(await restore_lost_credentials(j, store, metrics)) == ["a", "b", "c", "d"]
    finally:
        for k in [k async for k in r.scan_iter(f"{prefix}*")]:
            await r.delete(k)
        await r.aclose()
