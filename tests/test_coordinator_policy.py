"""Pure eligibility / selection / pacing policy."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.errors import JobError
from coordinator.policy import (
    DeviceView,
    EligibilityPolicy,
    SelectionConfig,
    decode_versions,
    encode_versions,
    next_round,
    over_select,
    pace_delay,
    round_carry,
    round_target,
    select,
    sync_round_size,
)

NOW = 1_000_000.0


def dev(i: int | str, **kw: object) -> DeviceView:
    base: dict[str, object] = dict(
        battery=80.0, charging=False, network="wifi", metered=False, bandwidth_kbps=1000.0,
        idle=True, agent_version="1.2.0", online=True, last_seen=NOW,
    )  # fmt: skip
    base.update(kw)
    return DeviceView(device_id=str(i), **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"online": False}, "offline"),
        ({"current_task": "t1"}, "training"),
        ({"battery": 10.0}, "battery"),
        ({"metered": True}, "metered"),
        ({"network": "none"}, "no_network"),
        ({"bandwidth_kbps": 10.0}, "bandwidth"),
        ({"idle": False}, "not_idle"),
        ({"agent_version": "1.1.9"}, "agent_version"),
        ({"cooldown_until": NOW + 5}, "cooldown"),
        ({"tasks_today": 3, "day": int(NOW // 86400)}, "daily_cap"),
    ],
)
def test_each_rule_rejects(kw: dict[str, object], reason: str) -> None:
    policy = EligibilityPolicy(
        min_battery=20,
        min_bandwidth_kbps=100,
        require_idle=True,
        min_agent_version="1.2",
        daily_cap=3,
    )
    assert policy.eligible(dev(1), NOW)
    assert reason in policy.reasons(dev(1, **kw), NOW)


def test_charging_overrides_low_battery_and_metered_allowed_per_job() -> None:
    assert EligibilityPolicy().eligible(dev(1, battery=5.0, charging=True), NOW)
    assert EligibilityPolicy(allow_metered=True).eligible(dev(1, metered=True), NOW)
    yesterday = dev(1, tasks_today=9, day=int(NOW // 86400) - 1)
    assert EligibilityPolicy(daily_cap=3).eligible(yesterday, NOW)


def test_policy_validation() -> None:
    with pytest.raises(JobError):
        EligibilityPolicy(min_battery=101)
    with pytest.raises(JobError):
        EligibilityPolicy.from_dict({"bogus": 1})
    p = EligibilityPolicy.from_dict({"min_battery": 50, "allow_metered": True})
    assert EligibilityPolicy.from_dict(p.to_dict()) == p


def test_select_prefers_least_contributed_and_respects_slots() -> None:
    devices = [dev(i, contributions=c) for i, c in enumerate([5, 0, 3, 0, 1])]
    picked = select(devices, 3, policy=EligibilityPolicy(), now=NOW)
    assert sorted(d.contributions for d in picked) == [0, 0, 1]
    assert select(devices, 0, policy=EligibilityPolicy(), now=NOW) == []
    assert len(select(devices, 99, policy=EligibilityPolicy(), now=NOW)) == 5


def test_select_skips_ineligible_and_excluded() -> None:
    devices = [dev(1), dev(2, battery=1.0), dev(3), dev(4, online=False)]
    picked = select(devices, 10, policy=EligibilityPolicy(), now=NOW, exclude=["3"])
    assert [d.device_id for d in picked] == ["1"]


def test_select_stratifies_across_networks() -> None:
    wifi = [dev(f"w{i}") for i in range(10)]
    eth = [dev(f"e{i}", network="ethernet") for i in range(2)]
    picked = select(wifi + eth, 4, policy=EligibilityPolicy(), now=NOW)
    nets = [d.network for d in picked]
    assert nets.count("ethernet") == 2 and nets.count("wifi") == 2


def test_over_select_and_pace() -> None:
    assert over_select(10, 1.3) == 13
    assert over_select(1, 1.0) == 1
    with pytest.raises(JobError):
        over_select(10, 0.5)
    delays = {pace_delay(f"d{i}", 30.0, 1000, 1.0, "s") for i in range(50)}
    assert len(delays) > 40  # spread, not a thundering herd
    assert all(500.0 <= d < 1500.0 for d in delays)  # ~ waiting / rate, jittered
    assert pace_delay("d1", 30.0, 1, 10.0, "s") >= 15.0  # floored at base


def test_pace_never_outlasts_the_liveness_ttl() -> None:
    """A paced agent is silent for its delay; past the telemetry TTL the coordinator would
    count it offline and stop selecting it (seen in load tests: ~270 of 300 idle devices
    "offline" while all were connected). The selector bounds every delay below the TTL."""
    from coordinator.selector import PACE_TTL_SHARE
    from coordinator.settings import CoordinatorSettings

    ttl = CoordinatorSettings(http_port=0).telemetry_ttl_s
    cap = PACE_TTL_SHARE * ttl
    delays = [pace_delay(f"d{i}", 30.0, 270, 1.0, "s", max_s=cap) for i in range(300)]
    assert max(delays) <= cap < ttl
    assert len(set(delays)) > 100  # still spread below the cap, not all equal


def gate(**kw: object) -> str:
    """``next_round`` for a closed K=10 round opened on versions [3, 3], deadline NOW."""
    base: dict[str, object] = dict(
        closed=True, pending=10, round_size=10, base_versions=[3, 3],
        latest_versions=[3, 3], deadline_ts=NOW, grace_s=30.0, now=NOW - 5.0,
    )  # fmt: skip
    base.update(kw)
    return next_round(**base)  # type: ignore[arg-type]


def test_next_round_waits_until_every_shard_moved() -> None:
    assert gate(closed=False, latest_versions=[4, 4]) == "wait"  # round still open
    assert gate() == "wait"  # closed on count, aggregators not flushed yet
    assert gate(latest_versions=[4, 3]) == "wait"  # one shard flushed: half-updated model
    assert gate(latest_versions=None) == "wait"  # registry has nothing for the job (yet)
    assert gate(latest_versions=[4]) == "wait"  # shard count mismatch: not comparable
    assert gate(latest_versions=[4, 4]) == "advanced"
    assert gate(latest_versions=[9, 5], now=NOW + 999.0) == "advanced"


def test_next_round_grace_bounds_the_wait() -> None:
    assert gate(now=NOW + 29.9) == "wait"
    assert gate(now=NOW + 30.0) == "grace"  # lost round: open anyway after the grace
    assert gate(latest_versions=[4, 3], now=NOW + 31.0) == "grace"
    assert gate(grace_s=0.0, now=NOW) == "grace"


def test_next_round_short_round_and_untracked() -> None:
    # closed at the deadline with fewer than K outstanding: the aggregator will not flush
    assert gate(pending=4, now=NOW) == "short"
    assert gate(pending=0, now=NOW) == "short"
    assert gate(pending=4, now=NOW - 1.0) == "wait"  # (not closed by deadline yet)
    assert gate(pending=12, now=NOW + 1.0) == "wait"  # K reached: wait for the flush
    assert gate(base_versions=None) == "untracked"  # no registry view: old behaviour
    assert gate(base_versions=[]) == "untracked"


def test_round_carry_and_target() -> None:
    assert round_carry("short", 4) == 4 and round_target(10, 4) == 6
    for d in ("advanced", "grace", "untracked"):
        assert round_carry(d, 12) == 0
    assert round_target(10, 0) == 10 and round_target(10, 25) == 1


def test_sync_round_size_matches_the_aggregator_k() -> None:
    assert sync_round_size(30, "fedavg", 30) == 30
    assert sync_round_size(30, "fedavg", 10) == 10  # the aggregator's K wins
    assert sync_round_size(30, "fedasync", 10) == 30  # any base admitted: concurrency


def test_versions_round_trip_and_grace_validation() -> None:
    assert encode_versions([3, 14]) == "3,14" and decode_versions("3,14") == [3, 14]
    assert encode_versions(None) == "" and decode_versions("") is None
    assert decode_versions("3,x") is None
    assert SelectionConfig.from_dict({"mode": "sync"}).round_grace_s == 30.0
    with pytest.raises(JobError):
        SelectionConfig(round_grace_s=-1.0)


@pytest.mark.parametrize(
    ("cls", "body", "where"),
    [
        (EligibilityPolicy, {"min_agent_version": 5}, "min_agent_version"),
        (EligibilityPolicy, {"min_battery": "high"}, "min_battery"),
        (EligibilityPolicy, {"allow_metered": 1}, "allow_metered"),
        (SelectionConfig, {"mode": "bogus"}, "mode"),
        (SelectionConfig, {"over_selection": "2"}, "over_selection"),
    ],
)
def test_policy_bodies_are_typed_at_job_creation(
    cls: Any, body: dict[str, Any], where: str
) -> None:
    """A wrongly typed field is a JobError naming it (422), never a value that breaks a
    later selection pass (``min_agent_version: 5`` used to be stored and crash it)."""
    with pytest.raises(JobError) as e:
        cls.from_dict(body)
    assert where in str(e.value)
