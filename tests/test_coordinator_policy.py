"""Pure eligibility / selection / pacing policy."""

from __future__ import annotations

import pytest

from coordinator.errors import JobError
from coordinator.policy import DeviceView, EligibilityPolicy, over_select, pace_delay, select

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
