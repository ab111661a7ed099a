"""Fleet state in Redis: telemetry batching, TTL liveness, device views and summaries.

Keys (named in ``coordinator.keys``; ``p`` = the coordinator's key prefix, ``{t}`` its slot tag)::

    {p}{t}dev:{id} hash  human-readable detail (telemetry fields, state, timestamps)
    {p}{t}selt     hash  device -> packed telemetry for selection (one field per device)
    {p}{t}sels     hash  device -> packed task state: current_task|cooldown|contrib|today|day
    {p}{t}seen     zset  device -> last_seen, online devices only (offline status removes it)
    {p}{t}lastseen zset  device -> last_seen, every device ever seen
    {p}{t}contrib  zset  device -> contributions + a fixed per-device fraction (tie-break)
    {p}{t}hist:{id} list  the device's last task outcomes

Selection never scans the whole fleet: ``candidates`` walks ``contrib`` from the
least-contributed device upwards, a page at a time (a script keeps the page's online
devices, by their ``seen`` score; HMGET on the two packed hashes for those only), and stops
as soon as it has enough eligible devices. A device is
*online* while it is in ``seen`` with a score inside the telemetry TTL; *training* while
it holds a task; otherwise *idle*.

A device not heard from for ``device_ttl_s`` leaves the fleet: ``sweep`` (every
coordinator runs it every ``device_sweep_s``; one atomic script per batch, so sweeps of
several coordinators only repeat each other's no-ops) removes it from every index above
and deletes its ``dev`` and ``hist`` keys. Kept past the TTL while it holds something a
later message still needs: a task that is offered, accepted or uploading (its lease
decides, not the TTL), a cooldown, or a count toward today's ``daily_cap``. Redis key
TTLs cannot do this: the fields of ``selt``/``sels`` and the members of the sorted sets
have none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio import Redis

from coordinator.keys import Keys
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import DeviceView, EligibilityPolicy
from schemas.messages import DeviceStatus, Telemetry

log = logging.getLogger(__name__)

CHUNK = 10_000
HISTORY = 20
SWEEP_BATCH = 500


def frac(device_id: str) -> float:
    """A fixed pseudo-random fraction in [0, 0.5) that orders devices with equal counts."""
    h = hashlib.blake2b(device_id.encode(), digest_size=4).digest()
    return int.from_bytes(h) / 2**33


def _b(v: bool) -> str:
    return "1" if v else "0"


def telemetry_fields(t: Telemetry, now: float) -> dict[str, str]:
    return {
        "battery": repr(float(t.battery)),
        "charging": _b(t.charging),
        "network": t.network,
        "metered": _b(t.metered),
        "bandwidth_kbps": repr(float(t.bandwidth_kbps)),
        "rtt_ms": repr(float(t.rtt_ms)),
        "idle": _b(t.idle),
        "agent_version": t.agent_version,
        "last_seen": repr(now),
        "ts": repr(float(t.ts)),
    }


def pack_telemetry(t: Telemetry) -> str:
    """``battery|charging|network|metered|bandwidth|rtt|idle|agent_version`` (version last)."""
    return (
        f"{float(t.battery)!r}|{_b(t.charging)}|{t.network}|{_b(t.metered)}|"
        f"{float(t.bandwidth_kbps)!r}|{float(t.rtt_ms)!r}|{_b(t.idle)}|{t.agent_version}"
    )


def pack_state(current_task: str, cooldown_until: float, contributions: int, today: int,
               day: int) -> str:  # fmt: skip
    return f"{current_task}|{cooldown_until!r}|{contributions}|{today}|{day}"


def unpack_state(raw: str | None) -> tuple[str, float, int, int, int]:
    if not raw:
        return "", 0.0, 0, 0, 0
    if raw == "|0.0|0|0|0":
        return "", 0.0, 0, 0, 0
    try:
        task, cool, contrib, today, day = raw.split("|")
        return task, float(cool), int(contrib), int(today), int(day)
    except ValueError:
        return "", 0.0, 0, 0, 0


def make_view(device_id: str, tel: str | None, state: str | None, online_score: float | None,
              last_seen: float | None, now: float, ttl: float) -> DeviceView | None:  # fmt: skip
    """Build a DeviceView from the packed records; junk falls back to safe defaults."""
    if tel is None and state is None and last_seen is None:
        return None
    task, cool, contrib, today, day = unpack_state(state)
    online = online_score is not None and online_score >= now - ttl
    seen = last_seen or 0.0
    if tel:
        try:
            bat, chg, net, met, bw, rtt, idle, ver = tel.split("|", 7)
            return DeviceView(
                device_id, float(bat), chg == "1", net, met != "0", float(bw), float(rtt),
                idle == "1", ver, online, seen, task, cool, contrib, today, day,
            )  # fmt: skip
        except ValueError:
            pass
    return DeviceView(device_id=device_id, online=online, last_seen=seen, current_task=task,
                      cooldown_until=cool, contributions=contrib, tasks_today=today,
                      day=day)  # fmt: skip


def device_state(d: DeviceView) -> str:
    if not d.online:
        return "offline"
    return "training" if d.current_task else "idle"


# One telemetry batch in one step (a concurrent sweep sees a device's records either
# before or after it): each device's detail hash, packed selection record and ``contrib``
# entry (NX: its fraction, if new) are written, and the senders are marked live, except
# devices whose ``offline`` status is younger than the grace: that telemetry was in flight
# (MQTT, the ingest batch) when the device said goodbye, and must not make a departed
# device selectable again. Later telemetry revives it. Returns the devices marked live.
# KEYS: selt, contrib, seen, lastseen, then each device's ``dev`` hash. ARGV: now, grace,
# the number of detail fields F, their names, then per device: id, packed telemetry,
# fraction, its F detail values.
_WRITE_TELEMETRY = """
local now = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local nf = tonumber(ARGV[3])
local i = 4 + nf
local n = 0
for d = 5, #KEYS do
  local id = ARGV[i]
  local h = {}
  for f = 1, nf do
    h[#h + 1] = ARGV[3 + f]
    h[#h + 1] = ARGV[i + 2 + f]
  end
  redis.call('HSET', KEYS[d], unpack(h))
  redis.call('HSET', KEYS[1], id, ARGV[i + 1])
  redis.call('ZADD', KEYS[2], 'NX', ARGV[i + 2], id)
  local st = redis.call('HMGET', KEYS[d], 'state', 'offline_ts')
  if st[1] ~= 'offline' or (tonumber(st[2]) or 0) + grace <= now then
    redis.call('HSET', KEYS[d], 'state', 'online')
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('ZADD', KEYS[4], now, id)
    n = n + 1
  end
  i = i + 3 + nf
end
return n
"""
OFFLINE_GRACE_S = 5.0

# An offline status (often a retained LWT the broker replays to every coordinator that
# subscribes) marks a device it knows; it never creates one (a swept device stays gone).
# KEYS[1] dev hash, KEYS[2] seen, KEYS[3] lastseen; ARGV: device id, now
_MARK_OFFLINE = """
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'offline', 'offline_ts', ARGV[2])
end
redis.call('ZREM', KEYS[2], ARGV[1])
"""

# One page of ``contrib`` (ranks ARGV[1]..ARGV[2]) reduced to its online devices: returns
# {page length, id, seen score, id, seen score, ...} for the members of ``seen`` scored at
# least ARGV[3]. KEYS[1] contrib, KEYS[2] seen.
_ONLINE_PAGE = """
local ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
local floor = tonumber(ARGV[3])
local out = {#ids}
for _, id in ipairs(ids) do
  local s = redis.call('ZSCORE', KEYS[2], id)
  if s and tonumber(s) >= floor then
    out[#out + 1] = id
    out[#out + 1] = s
  end
end
return out
"""

# Remove devices last seen before the cutoff, unless their packed state
# ``task|cooldown|contributions|today|day`` holds a live task (offered / accepted /
# uploading), a cooldown past now, or a task count of today. Returns {scanned, removed}.
# KEYS: lastseen, seen, contrib, selt, sels; ARGV: cutoff, now, offset, limit, device key
# prefix, history key prefix, task key prefix, today (unix day). The device, history and
# task keys it builds from those prefixes hash to the declared keys' slot (coordinator.keys).
_SWEEP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT',
                       tonumber(ARGV[3]), tonumber(ARGV[4]))
local now = tonumber(ARGV[2])
local removed = 0
for _, id in ipairs(ids) do
  local keep = false
  local raw = redis.call('HGET', KEYS[5], id)
  if raw then
    local p = {}
    for part in string.gmatch(raw .. '|', '([^|]*)|') do p[#p + 1] = part end
    if p[1] and p[1] ~= '' then
      local st = redis.call('HGET', ARGV[7] .. p[1], 'state')
      keep = st == 'offered' or st == 'accepted' or st == 'uploading'
    end
    if (tonumber(p[2] or '') or 0) > now then keep = true end
    if (tonumber(p[4] or '') or 0) > 0 and p[5] == ARGV[8] then keep = true end
  end
  if not keep then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[5], id)
    redis.call('DEL', ARGV[5] .. id, ARGV[6] .. id)
    removed = removed + 1
  end
end
return {#ids, removed}
"""


class FleetStore:
    """Redis adapter for device state. All methods are safe to call concurrently."""

    def __init__(
        self, redis: Redis, prefix: str, ttl_s: float, *, device_ttl_s: float = 0.0
    ) -> None:
        """``ttl_s``: liveness (telemetry TTL); ``device_ttl_s``: how long a silent device
        stays in the fleet (``sweep``; 0 = for ever)."""
        self._r: Any = redis  # Redis, decode_responses=True (redis-py types bytes | str)
        self._k = Keys(prefix)
        self.ttl = ttl_s
        self.device_ttl = device_ttl_s
        self._write_telemetry: Any = redis.register_script(_WRITE_TELEMETRY)
        self._mark_offline: Any = redis.register_script(_MARK_OFFLINE)
        self._sweep: Any = redis.register_script(_SWEEP)
        self._online_page: Any = redis.register_script(_ONLINE_PAGE)

    async def ping(self) -> bool:
        """Readiness: Redis answers (raises if it does not)."""
        return bool(await self._r.ping())

    async def write_telemetry(self, batch: Iterable[Telemetry], now: float | None = None) -> int:
        """Write a batch (latest per device wins) in one script; returns records written."""
        now = time.time() if now is None else now
        latest: dict[str, Telemetry] = {}
        for t in batch:
            latest[t.device_id] = t
        if not latest:
            return 0
        k = self._k
        names = list(telemetry_fields(next(iter(latest.values())), now))
        args: list[str] = [repr(now), repr(OFFLINE_GRACE_S), str(len(names)), *names]
        for dev, t in latest.items():
            fields = telemetry_fields(t, now)
            args += [dev, pack_telemetry(t), repr(frac(dev)), *(fields[f] for f in names)]
        await self._write_telemetry(
            keys=[k.selt, k.contrib, k.seen, k.lastseen, *(k.device(d) for d in latest)],
            args=args,
        )
        return len(latest)

    async def write_status(self, s: DeviceStatus, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if s.state == "offline":
            await self._mark_offline(
                keys=[self._k.device(s.device_id), self._k.seen, self._k.lastseen],
                args=[s.device_id, repr(now)],
            )
            return
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._k.device(s.device_id), mapping={"state": "online", "last_seen": repr(now)})
        pipe.zadd(self._k.seen, {s.device_id: now})
        pipe.zadd(self._k.lastseen, {s.device_id: now})
        await pipe.execute()

    async def sweep(self, now: float | None = None, batch: int = SWEEP_BATCH) -> int:
        """Remove the devices not heard from for ``device_ttl_s`` (see the module doc);
        returns how many. One script per ``batch`` devices (Redis is never blocked long)."""
        if self.device_ttl <= 0:
            return 0
        now = time.time() if now is None else now
        k = self._k
        keys = [k.lastseen, k.seen, k.contrib, k.selt, k.sels]
        fixed = [k.device_prefix, k.history(""), k.task(""), str(int(now // 86400))]
        removed = offset = 0
        while True:
            scanned, n = await self._sweep(
                keys=keys, args=[repr(now - self.device_ttl), repr(now), offset, batch, *fixed]
            )
            removed += int(n)
            offset += int(scanned) - int(n)  # the kept ones stay in front: step over them
            if int(scanned) < batch:
                return removed

    async def live_ids(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        ids = await self._r.zrangebyscore(self._k.seen, now - self.ttl, "+inf")
        return list(ids)

    async def views(self, ids: list[str], now: float | None = None) -> list[DeviceView]:
        now = time.time() if now is None else now
        out: list[DeviceView] = []
        for i in range(0, len(ids), CHUNK):
            part = ids[i : i + CHUNK]
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self._k.selt, part)
            pipe.hmget(self._k.sels, part)
            pipe.zmscore(self._k.seen, part)
            pipe.zmscore(self._k.lastseen, part)
            tel, st, on, seen = await pipe.execute()
            for j, dev in enumerate(part):
                v = make_view(dev, tel[j], st[j], on[j], seen[j], now, self.ttl)
                if v is not None:
                    out.append(v)
        return out

    async def candidates(
        self,
        want: int,
        accept: Callable[[DeviceView], bool],
        now: float | None = None,
        page: int = 2000,
        max_scan: int = 0,
    ) -> tuple[list[DeviceView], int]:
        """Up to ``want`` online devices passing ``accept``, least-contributed first.

        Returns (devices, scanned). ``max_scan`` (0 = no limit) bounds the devices read.
        """
        now = time.time() if now is None else now
        out: list[DeviceView] = []
        scanned = 0
        start = 0
        while len(out) < want and (not max_scan or scanned < max_scan):
            # the page's online devices only: offline ones (gone, or a burst of ids that
            # fell silent) cost the script a ZSCORE each, never a read of their records
            got = await self._online_page(
                keys=[self._k.contrib, self._k.seen],
                args=[start, start + page - 1, repr(now - self.ttl)],
            )
            n = int(got[0])
            if not n:
                break
            start += page
            scanned += n
            ids, on = got[1::2], [float(x) for x in got[2::2]]
            if not ids:
                continue
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self._k.selt, ids)
            pipe.hmget(self._k.sels, ids)
            tel, st = await pipe.execute()
            for j, dev in enumerate(ids):
                v = make_view(dev, tel[j], st[j], on[j], on[j], now, self.ttl)
                if v is not None and accept(v):
                    out.append(v)
                    if len(out) >= want:
                        break
        return out, scanned

    async def live_views(self, now: float | None = None) -> list[DeviceView]:
        """Every online device, read with three argument-free commands (fast for big fleets)."""
        now = time.time() if now is None else now
        pipe = self._r.pipeline(transaction=False)
        pipe.zrangebyscore(self._k.seen, now - self.ttl, "+inf", withscores=True)
        pipe.hgetall(self._k.selt)
        pipe.hgetall(self._k.sels)
        live, tel, st = await pipe.execute()
        out: list[DeviceView] = []
        for dev, score in live:
            v = make_view(dev, tel.get(dev), st.get(dev), score, score, now, self.ttl)
            if v is not None:
                out.append(v)
        return out

    async def all_views(self, now: float | None = None) -> list[DeviceView]:
        """Every known device (online or not), with argument-free commands only."""
        now = time.time() if now is None else now
        pipe = self._r.pipeline(transaction=False)
        pipe.zrange(self._k.lastseen, 0, -1, withscores=True)
        pipe.zrangebyscore(self._k.seen, now - self.ttl, "+inf", withscores=True)
        pipe.hgetall(self._k.selt)
        pipe.hgetall(self._k.sels)
        every, live, tel, st = await pipe.execute()
        online = dict(live)
        out: list[DeviceView] = []
        for dev, seen in every:
            v = make_view(dev, tel.get(dev), st.get(dev), online.get(dev), seen, now, self.ttl)
            if v is not None:
                out.append(v)
        return out

    async def get(self, device_id: str) -> dict[str, Any] | None:
        views = await self.views([device_id])
        if not views:
            return None
        h = await self._r.hgetall(self._k.device(device_id))
        out = device_json(views[0], h)
        out["history"] = await self.history(device_id)
        return out

    async def all_ids(self) -> list[str]:
        return sorted(await self._r.zrange(self._k.lastseen, 0, -1))

    async def count(self) -> int:
        return int(await self._r.zcard(self._k.lastseen))

    async def _state(self, device_id: str) -> tuple[str, float, int, int, int]:
        return unpack_state(await self._r.hget(self._k.sels, device_id))

    async def assign_task(
        self, device_id: str, task_id: str, now: float, *, counts: bool = True
    ) -> None:
        """Mark the device busy with ``task_id``; ``counts``: the task counts toward the
        device's tasks today (``daily_cap``; evaluation and statistics tasks do not)."""
        _, cool, contrib, today, day = await self._state(device_id)
        d = int(now // 86400)
        if day != d:
            today, day = 0, d
        today += 1 if counts else 0
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._k.sels, device_id, pack_state(task_id, cool, contrib, today, d))
        pipe.hset(self._k.device(device_id), mapping={"last_task_ts": repr(now)})
        await pipe.execute()

    async def release_task(
        self,
        device_id: str,
        task_id: str,
        *,
        contributed: bool,
        cooldown_until: float = 0.0,
        outcome: str = "",
    ) -> None:
        """Clear the device's current task (only if it is still ``task_id``).

        ``outcome`` (uploaded / expired / declined / ...) is appended to the device's
        participation history (the last ``HISTORY`` entries are kept).
        """
        cur, cool, contrib, today, day = await self._state(device_id)
        if cur == task_id:
            cur = ""
        if contributed:
            contrib += 1
        if cooldown_until:
            cool = max(cool, cooldown_until)
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._k.sels, device_id, pack_state(cur, cool, contrib, today, day))
        if contributed:
            pipe.hset(self._k.device(device_id), "last_contribution_ts", repr(time.time()))
            pipe.zadd(self._k.contrib, {device_id: contrib + frac(device_id)})
        if outcome:
            hist = self._k.history(device_id)
            pipe.lpush(hist, f"{time.time():.3f}|{task_id}|{outcome}")
            pipe.ltrim(hist, 0, HISTORY - 1)
        await pipe.execute()

    async def probation(self, device_id: str, until: float) -> None:
        """A newly enrolled device is not selected before ``until`` (its cooldown)."""
        cur, cool, contrib, today, day = await self._state(device_id)
        await self._r.hset(self._k.sels, device_id,
                           pack_state(cur, max(cool, until), contrib, today, day))  # fmt: skip

    async def forget(self, device_id: str) -> None:
        """Remove a device from every fleet index, its detail and its history (revoked)."""
        k = self._k
        pipe = self._r.pipeline(transaction=True)
        for z in (k.lastseen, k.seen, k.contrib):
            pipe.zrem(z, device_id)
        pipe.hdel(k.selt, device_id)
        pipe.hdel(k.sels, device_id)
        pipe.delete(k.device(device_id), k.history(device_id))
        await pipe.execute()

    async def hold(self, job_id: str, device_id: str, until: float) -> None:
        """Keep ``device_id`` out of ``job_id``'s selection until ``until`` (a device whose
        data cannot train this job is not re-issued at once: no abort storm)."""
        await self._r.zadd(self._k.holds(job_id), {device_id: until})

    async def held(self, job_id: str, now: float) -> set[str]:
        """Devices held off ``job_id`` at ``now`` (expired holds are dropped)."""
        key = self._k.holds(job_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zrange(key, 0, -1)
        _, ids = await pipe.execute()
        return set(ids)

    async def history(self, device_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in await self._r.lrange(self._k.history(device_id), 0, HISTORY - 1):
            parts = item.split("|")
            if len(parts) == 3:
                try:
                    out.append({"ts": float(parts[0]), "task_id": parts[1], "outcome": parts[2]})
                except ValueError:
                    continue
        return out


async def run_sweep(fleet: FleetStore, every_s: float, metrics: CoordinatorMetrics) -> None:
    """The coordinator's fleet sweep loop (errors: the service's supervisor restarts it)."""
    while True:
        n = await fleet.sweep()
        if n:
            metrics.devices_expired.inc(n)
            log.info("fleet sweep: %d devices not heard from for %.0fs removed", n,
                     fleet.device_ttl)  # fmt: skip
        await asyncio.sleep(every_s)


def device_json(v: DeviceView, h: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device_id": v.device_id,
        "state": device_state(v),
        "battery": v.battery,
        "charging": v.charging,
        "network": v.network,
        "metered": v.metered,
        "bandwidth_kbps": v.bandwidth_kbps,
        "rtt_ms": v.rtt_ms,
        "idle": v.idle,
        "agent_version": v.agent_version,
        "last_seen": v.last_seen,
        "current_task": v.current_task or None,
        "contributions": v.contributions,
        "tasks_today": v.tasks_today,
        "cooldown_until": v.cooldown_until or None,
    }
    if h is not None:
        for extra in ("last_task_ts", "last_contribution_ts", "offline_ts", "ts"):
            if extra in h:
                try:
                    out[extra] = float(h[extra])
                except ValueError:
                    pass
    return out


def fleet_summary(
    views: list[DeviceView], total: int, policy: EligibilityPolicy, now: float
) -> dict[str, Any]:
    """Pure summary for ``GET /v1/fleet`` over the devices currently considered online."""
    counts = {"offline": 0, "idle": 0, "training": 0}
    hist = [0] * 10
    nets: dict[str, int] = {}
    eligible = 0
    contributed = 0
    for v in views:
        counts[device_state(v)] += 1
        if v.online:
            hist[min(int(v.battery // 10), 9)] += 1
            nets[v.network] = nets.get(v.network, 0) + 1
            eligible += policy.eligible(v, now)
        contributed += v.contributions > 0
    online = counts["idle"] + counts["training"]
    counts["offline"] = max(total - online, counts["offline"])
    return {
        "total": total,
        "counts": counts,
        "online": online,
        "eligible_now": eligible,
        "training_now": counts["training"],
        "battery_histogram": {f"{10 * i}-{10 * i + 10}": n for i, n in enumerate(hist)},
        "network_mix": nets,
        "participation_rate": (contributed / total) if total else 0.0,
    }
