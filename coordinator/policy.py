"""Pure eligibility and selection policy (no I/O).

``DeviceView`` is what the fleet store knows about a device at selection time.
``EligibilityPolicy`` decides whether a device may train now; ``select`` picks which
eligible devices get the free slots, preferring the least-contributed and spreading picks
across network types. ``pace_delay`` spreads the check-back time of devices not picked.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import msgspec

from coordinator.errors import JobError
from coordinator.stopping import plateau_reason, target_reason

P = TypeVar("P")


def _from_dict(cls: type[P], data: Mapping[str, Any], what: str) -> P:
    """A policy dataclass from a request body: unknown fields refused, every field typed
    (a string field given a number is refused here, not in a later selection pass)."""
    unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise JobError(what, f"unknown {what} fields {sorted(unknown)}")
    try:
        return msgspec.convert(dict(data), cls, strict=True)
    except msgspec.ValidationError as exc:
        raise JobError(what, str(exc)) from None


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    battery: float = 0.0
    charging: bool = False
    network: str = "none"
    metered: bool = True
    bandwidth_kbps: float = 0.0
    rtt_ms: float = 0.0
    idle: bool = False
    agent_version: str = "0"
    online: bool = False
    last_seen: float = 0.0
    current_task: str = ""
    cooldown_until: float = 0.0
    contributions: int = 0
    tasks_today: int = 0
    day: int = 0  # day number (unix days) of tasks_today


@functools.lru_cache(maxsize=1024)
def parse_version(v: str) -> tuple[int, ...]:
    """'1.10.2' -> (1, 10, 2); non-numeric parts count as 0."""
    out: list[int] = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class EligibilityPolicy:
    """Per-job rules; ``reasons`` returns why a device is not eligible (empty = eligible)."""

    min_battery: float = 20.0
    allow_metered: bool = False
    min_bandwidth_kbps: float = 0.0
    require_idle: bool = False
    min_agent_version: str = "0"
    cooldown_s: float = 0.0
    daily_cap: int = 0  # 0 = unlimited

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_battery <= 100.0:
            raise JobError("eligibility", "min_battery must be in [0, 100]")
        if self.min_bandwidth_kbps < 0 or self.cooldown_s < 0 or self.daily_cap < 0:
            raise JobError("eligibility", "bandwidth, cooldown and daily_cap must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EligibilityPolicy:
        return _from_dict(cls, data, "eligibility")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reasons(self, d: DeviceView, now: float) -> list[str]:
        out: list[str] = []
        if not d.online:
            out.append("offline")
        if d.current_task:
            out.append("training")
        if d.battery < self.min_battery and not d.charging:
            out.append("battery")
        if d.network == "none":
            out.append("no_network")
        if d.metered and not self.allow_metered:
            out.append("metered")
        if d.bandwidth_kbps < self.min_bandwidth_kbps:
            out.append("bandwidth")
        if self.require_idle and not d.idle:
            out.append("not_idle")
        if parse_version(d.agent_version) < parse_version(self.min_agent_version):
            out.append("agent_version")
        if d.cooldown_until > now:
            out.append("cooldown")
        if self.daily_cap and d.day == int(now // 86400) and d.tasks_today >= self.daily_cap:
            out.append("daily_cap")
        return out

    def eligible(self, d: DeviceView, now: float) -> bool:
        """Same rules as ``reasons`` without building the list (hot path of selection)."""
        return (
            d.online
            and not d.current_task
            and (d.charging or d.battery >= self.min_battery)
            and d.network != "none"
            and (self.allow_metered or not d.metered)
            and d.bandwidth_kbps >= self.min_bandwidth_kbps
            and (d.idle or not self.require_idle)
            and d.cooldown_until <= now
            and not (self.daily_cap and d.day == int(now // 86400)
                     and d.tasks_today >= self.daily_cap)
            and (self.min_agent_version == "0"
                 or parse_version(d.agent_version) >= parse_version(self.min_agent_version))
        )  # fmt: skip


def acceptor(
    policy: EligibilityPolicy, skip: set[str], now: float
) -> Callable[[DeviceView], bool]:
    """The candidate filter of a selection pass: eligible now and not in ``skip``."""

    def accept(d: DeviceView) -> bool:
        return d.device_id not in skip and policy.eligible(d, now)

    return accept


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionConfig:
    """How a job fills its slots.

    ``async``: keep ``concurrency`` devices training, refill as updates arrive (default).
    ``sync``: the baseline — rounds of ``K = sync_round_size(...)`` updates; each invites
    ``over_select(K, over_selection)`` devices and closes when ``K`` updates were accepted
    or after ``round_deadline_s``; leftover tasks of a closed round are expired. The next
    round opens only once the published model moved past the closed round's base (see
    ``next_round``), or ``round_grace_s`` after the closed round's deadline.
    """

    mode: Literal["async", "sync"] = "async"
    over_selection: float = 1.3
    round_deadline_s: float = 120.0
    round_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in ("async", "sync"):
            raise JobError("selection", "mode must be 'async' or 'sync'")
        if not self.over_selection >= 1.0 or not self.round_deadline_s > 0:
            raise JobError("selection", "over_selection >= 1 and round_deadline_s > 0")
        if not self.round_grace_s >= 0:
            raise JobError("selection", "round_grace_s must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectionConfig:
        return _from_dict(cls, data, "selection")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class StopConfig:
    """When a job ends by itself (0 = no such limit). ``max_updates``: updates applied on
    every shard; ``max_wall_s``: seconds since the job was created; ``target_accuracy``:
    the federated accuracy of ``target_hold`` consecutive complete evaluations reached it;
    ``plateau_window`` W: the best accuracy of the last W complete evaluations does not
    beat the best before them by more than ``plateau_delta`` (needs W + 1 evaluations).
    The job then ends ``completed`` with the condition as its reason and its final
    version pinned."""

    max_updates: int = 0
    max_wall_s: float = 0.0
    target_accuracy: float = 0.0
    target_hold: int = 1
    plateau_window: int = 0
    plateau_delta: float = 0.001

    def __post_init__(self) -> None:
        if self.max_updates < 0 or self.max_wall_s < 0:
            raise JobError("stop", "max_updates and max_wall_s must be >= 0 (0: no limit)")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise JobError("stop", "target_accuracy must be in [0, 1] (0: off)")
        if self.target_hold < 1 or self.plateau_window < 0 or not self.plateau_delta >= 0:
            raise JobError("stop", "target_hold >= 1, plateau_window >= 0, plateau_delta >= 0")

    @property
    def on_evaluations(self) -> bool:
        """Whether a condition reads federated evaluations."""
        return bool(self.target_accuracy or self.plateau_window)

    @property
    def any(self) -> bool:
        return bool(self.max_updates or self.max_wall_s or self.on_evaluations)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StopConfig:
        return _from_dict(cls, data, "stop")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stop_reason(
    stop: StopConfig, applied: int, created_ts: float, now: float,
    accuracies: Sequence[float] = (),
) -> str | None:  # fmt: skip
    """The condition that ends a job now, if any (pure). ``accuracies``: the federated
    accuracy of each complete evaluation, oldest first."""
    if stop.max_updates and applied >= stop.max_updates:
        return f"max_updates: {applied} updates applied on every shard (limit {stop.max_updates})"
    if stop.max_wall_s and now - created_ts >= stop.max_wall_s:
        return f"max_wall_s: ran {now - created_ts:.0f} s (limit {stop.max_wall_s:g} s)"
    return target_reason(accuracies, stop.target_accuracy, stop.target_hold) or plateau_reason(
        accuracies, stop.plateau_window, stop.plateau_delta
    )


def round_closed(accepted_in_round: int, target: int, deadline_ts: float, now: float) -> bool:
    """A synchronous round ends when enough updates arrived or at its deadline."""
    return accepted_in_round >= target or now >= deadline_ts


def sync_round_size(concurrency: int, strategy: str, buffer_size: int) -> int:
    """Updates per synchronous round (``K``), the same number on both sides.

    Under FedAvg the aggregator closes a round (advances the shard version) after exactly
    ``strategy.buffer_size`` admitted updates and rejects anything trained on an older
    version (``wrong_round``), so the coordinator's round size must be that ``K``: fewer
    and the shards never advance (every round waits out the grace period), more and the
    surplus lands on the next version and is rejected. Other strategies accept any base,
    so their rounds are ``concurrency`` updates.
    """
    return buffer_size if strategy == "fedavg" else concurrency


def check_sync_round_size(mode: str, strategy: str, concurrency: int, buffer_size: int) -> None:
    """A sync FedAvg job must set ``concurrency == strategy.buffer_size`` (``JobError``).

    Both name the round size ``K``: the aggregator flushes after ``buffer_size`` updates,
    the coordinator sizes (and caps) its rounds by ``sync_round_size``. Two numbers for one
    thing only hide which one is used, so a job where they differ is refused.
    """
    if mode == "sync" and strategy == "fedavg" and concurrency != buffer_size:
        raise JobError(
            "validation",
            f"sync fedavg job: concurrency ({concurrency}) must equal strategy.buffer_size "
            f"({buffer_size}), the round size K",
        )


def encode_versions(versions: Sequence[int] | None) -> str:
    """Shard versions for the round hash: ``"3,3"``; ``""`` = unknown."""
    return "" if not versions else ",".join(str(int(v)) for v in versions)


def decode_versions(raw: str | None) -> list[int] | None:
    """Inverse of ``encode_versions``; None for missing or malformed values."""
    if not raw:
        return None
    try:
        return [int(v) for v in raw.split(",")]
    except ValueError:
        return None


NextRound = Literal["wait", "advanced", "short", "untracked", "grace"]


def next_round(
    *,
    closed: bool,
    pending: int,
    round_size: int,
    base_versions: Sequence[int] | None,
    latest_versions: Sequence[int] | None,
    deadline_ts: float,
    grace_s: float,
    now: float,
) -> NextRound:
    """May the next synchronous round open? ``"wait"`` = no; any other value = yes, because:

    * ``advanced``: every shard of the job's newest published model is past the version
      it had when the closed round opened (the aggregators applied the round and the
      registry published it, so invited devices pull the new model);
    * ``short``: the round closed at its deadline with fewer than ``round_size`` (``K``)
      updates outstanding (``pending`` = accepted in this round + carried from earlier
      short rounds): the aggregators will not advance on their own, the current version is
      still the round's, so the next round trains on it and completes the buffer;
    * ``untracked``: the round recorded no base versions (no registry view, or a round
      opened before this rule) — the old behaviour, open at once;
    * ``grace``: ``grace_s`` past the round's deadline the model still has not moved
      (updates lost or rejected); open anyway so the job cannot stall.
    """
    if not closed:
        return "wait"
    if not base_versions:
        return "untracked"
    if (
        latest_versions is not None
        and len(latest_versions) == len(base_versions)
        and all(new > old for new, old in zip(latest_versions, base_versions, strict=True))
    ):
        return "advanced"
    if pending < round_size and now >= deadline_ts:
        return "short"
    if now >= deadline_ts + grace_s:
        return "grace"
    return "wait"


def round_carry(decision: NextRound, pending: int) -> int:
    """Updates still buffered on the aggregators when the next round opens.

    Only a ``short`` round leaves a known partial buffer; after ``advanced`` it was
    applied, and after ``grace``/``untracked`` the aggregators' state is unknown (0, so a
    wrong guess costs at most one more grace period, never a stall).
    """
    return max(0, pending) if decision == "short" else 0


def round_target(round_size: int, carry: int) -> int:
    """Accepted updates that close the next round: what is missing from ``K``."""
    return max(1, round_size - max(0, carry))


def _tiebreak(device_id: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}:{device_id}".encode(), digest_size=8).digest())


def select(
    candidates: Iterable[DeviceView],
    slots: int,
    *,
    policy: EligibilityPolicy,
    now: float,
    salt: str = "",
    exclude: Sequence[str] = (),
) -> list[DeviceView]:
    """Pick up to ``slots`` eligible devices.

    Order: fewest contributions first (ties broken by a salted hash so repeated passes do
    not always favour the same ids); picks round-robin across network types so one
    network class cannot take every slot while others have eligible devices.
    """
    if slots <= 0:
        return []
    skip = set(exclude)
    by_net: dict[str, list[DeviceView]] = defaultdict(list)
    for d in candidates:
        if d.device_id not in skip and policy.eligible(d, now):
            by_net[d.network].append(d)
    for lst in by_net.values():
        lst.sort(key=lambda d: (d.contributions, _tiebreak(d.device_id, salt)))
    picked: list[DeviceView] = []
    nets = sorted(by_net, key=lambda n: (by_net[n][0].contributions, n))
    cursors = dict.fromkeys(nets, 0)
    while len(picked) < slots and nets:
        for net in list(nets):
            i = cursors[net]
            if i >= len(by_net[net]):
                nets.remove(net)
                continue
            picked.append(by_net[net][i])
            cursors[net] = i + 1
            if len(picked) >= slots:
                break
    return picked


def over_select(target: int, factor: float) -> int:
    """Synchronous-round baseline: how many devices to invite for ``target`` results."""
    if factor < 1.0:
        raise JobError("selection", "over-selection factor must be >= 1")
    return max(target, int(-(-target * factor // 1)))


_JITTER_LO, _JITTER_HI = 0.5, 1.5  # pace jitter range [lo, hi) as a share of the horizon


def pace_delay(
    device_id: str,
    base_s: float,
    waiting: int,
    slots_per_s: float,
    salt: str,
    max_s: float = float("inf"),
) -> float:
    """Check-back delay for a device not picked: spread ``waiting`` devices over time.

    The expected wait grows with the queue (``waiting / slots_per_s``), floored at
    ``base_s``, and each device gets a deterministic jitter in [0.5, 1.5) of it so
    they do not all return at once. The result stays below ``max_s`` (the horizon is capped
    at ``max_s / 1.5``, the jitter's upper end, so capped delays are still spread): a paced agent
    sends no telemetry until the delay is over, so the caller passes a bound below the
    telemetry liveness TTL, or the device would be counted offline (and not selectable)
    for the rest of its pace.
    """
    horizon = min(max(base_s, waiting / max(slots_per_s, 1e-9)), max_s / _JITTER_HI)
    jitter = _JITTER_LO + (_tiebreak(device_id, salt) % 10_000) / 10_000.0
    return round(horizon * jitter, 3)
