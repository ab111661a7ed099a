"""Redis I/O of federated evaluation and of the statistics phase (the sums only; the math
is ``coordinator.evaluation`` and ``coordinator.standardize``).

Keys (named in ``coordinator.keys``)::

    {p}{t}evals:{job}       zset  evaluated version -> version (the index, oldest first)
    {p}{t}eval:{job}:{v}    hash  opened_ts, asked, reports, examples, loss_sum, correct,
                                 ce.{i}, cc.{i} (per class), closed_ts, complete,
                                 final, need (a completed job's final evaluation)
    {p}{t}evaldev:{job}:{v} set   devices that reported for version v (never asked again)
    {p}{t}fedstats:{job}    hash  opened_ts, reports, rows, fsum.{i}, fsq.{i},
                                 label.{raw} (rows), labeldev.{raw} (devices), closed_ts
    {p}{t}fedstatsdev:{job} set   devices that reported statistics (never asked again)

A report is folded in one script (``_FOLD``): its task must be of the report's kind and
still ``offered``/``accepted``/``expired``, and the aggregate open; the task becomes
``reported`` (one report per task: a re-sent one finds it so and is a duplicate), its side
lease is dropped and the sums are added (``HINCRBY``/``HINCRBYFLOAT``). An evaluation
closes in the same step once it has ``min_reports`` reports (a final evaluation: ``need``).
"""

from __future__ import annotations

from typing import Any, Literal

from redis.asyncio import Redis

from coordinator.evaluation import Evaluation
from coordinator.keys import Keys
from coordinator.standardize import FeatureStats
from coordinator.tasks import TaskRecord
from schemas.messages import EvalReport, StatsReport

# KEYS: task, side leases, aggregate hash, reporter set. ARGV: kind, now, min_reports (0: no
# auto-close; an aggregate with ``need`` closes at that many), device, add-to-set flag,
# number of integer pairs, then the integer (field, increment) pairs, then the float pairs.
_FOLD = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'UNKNOWN' end
local kind = redis.call('HGET', KEYS[1], 'kind') or 'train'
if kind ~= ARGV[1] then return 'KIND:' .. kind end
if st == 'reported' then return 'DUPLICATE' end
if st ~= 'offered' and st ~= 'accepted' and st ~= 'expired' then return 'STATE:' .. st end
if redis.call('HEXISTS', KEYS[3], 'opened_ts') == 0
   or redis.call('HEXISTS', KEYS[3], 'closed_ts') == 1 then
  return 'CLOSED'
end
redis.call('HSET', KEYS[1], 'state', 'reported', 'reported_ts', ARGV[2])
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'task_id'))
if ARGV[5] == '1' then redis.call('SADD', KEYS[4], ARGV[4]) end
local nint = tonumber(ARGV[6])
local i = 7
for _ = 1, nint do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i + 1 <= #ARGV do
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n = redis.call('HINCRBY', KEYS[3], 'reports', 1)
local closed = '0'
local at = tonumber(ARGV[3])
local need = redis.call('HGET', KEYS[3], 'need')
if need and at > 0 then at = tonumber(need) end
if at > 0 and n >= at then
  redis.call('HSET', KEYS[3], 'closed_ts', ARGV[2], 'complete', '1')
  closed = '1'
end
return 'OK:' .. n .. ':' .. closed
"""

# KEYS: evaluation hash. ARGV: now, min_reports. Close it if open; returns 1 if it did.
_CLOSE = """
if redis.call('HEXISTS', KEYS[1], 'opened_ts') == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'closed_ts') == 1 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], 'reports') or '0')
local ok = '0'
if n >= tonumber(ARGV[2]) then ok = '1' end
redis.call('HSET', KEYS[1], 'closed_ts', ARGV[1], 'complete', ok)
return 1
"""

Folded = Literal["ok", "closed_now", "duplicate", "closed", "unknown_task", "wrong_kind",
                 "bad_state"]  # fmt: skip


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _outcome(res: Any) -> Folded:
    r = _s(res)
    if r.startswith("OK:"):
        return "closed_now" if r.endswith(":1") else "ok"
    return {"UNKNOWN": "unknown_task", "DUPLICATE": "duplicate", "CLOSED": "closed"}.get(
        r, "wrong_kind" if r.startswith("KIND:") else "bad_state"
    )  # type: ignore[return-value]


def evaluation_from_hash(version: int, h: dict[str, str]) -> Evaluation:
    n_classes = sum(1 for k in h if k.startswith("ce."))
    closed = h.get("closed_ts")
    return Evaluation(
        version=version, opened_ts=float(h.get("opened_ts") or 0.0),
        reports=int(h.get("reports") or 0), examples=int(h.get("examples") or 0),
        loss_sum=float(h.get("loss_sum") or 0.0), correct=int(h.get("correct") or 0),
        class_examples=tuple(int(h.get(f"ce.{i}") or 0) for i in range(n_classes)),
        class_correct=tuple(int(h.get(f"cc.{i}") or 0) for i in range(n_classes)),
        asked=int(h.get("asked") or 0), closed_ts=float(closed) if closed else None,
        complete=h.get("complete") == "1", final=h.get("final") == "1",
        need=int(h.get("need") or 0),
    )  # fmt: skip


class EvalStore:
    """The evaluations of every job (sums per version) and the statistics phase."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._r: Any = redis  # decode_responses=True
        self._k = Keys(prefix)
        self._fold = redis.register_script(_FOLD)
        self._close = redis.register_script(_CLOSE)

    # ------------------------------------------------------------------ evaluations
    async def open(self, job_id: str, version: int, now: float) -> bool:
        """Start the evaluation of ``version``; False if it exists."""
        key = self._k.evaluation(job_id, version)
        if not await self._r.hsetnx(key, "opened_ts", repr(now)):
            return False
        await self._r.zadd(self._k.evals(job_id), {str(version): version})
        return True

    async def open_final(self, job_id: str, version: int, need: int, now: float) -> bool:
        """Make the evaluation of ``version`` the job's final one, waiting for ``need``
        reports from ``now`` on: a new one, or the existing one of that version reopened
        (its reports stay: same version; its reporters are not asked again). False if
        the job already has its final evaluation."""
        key = self._k.evaluation(job_id, version)
        if await self._r.hget(key, "final") == "1":
            return False
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping={"opened_ts": repr(now), "final": "1", "need": str(need)})
        pipe.hdel(key, "closed_ts", "complete")
        pipe.zadd(self._k.evals(job_id), {str(version): version})
        await pipe.execute()
        return True

    async def reporters(self, job_id: str, version: int) -> set[str]:
        """Devices that reported for the evaluation of ``version``."""
        return set(await self._r.smembers(self._k.eval_devices(job_id, version)))

    async def last_version(self, job_id: str) -> int | None:
        got = await self._r.zrange(self._k.evals(job_id), -1, -1)
        return int(got[0]) if got else None

    async def evaluations(self, job_id: str, newest: int = 0) -> list[Evaluation]:
        """Evaluations of ``job_id``, oldest first (``newest`` > 0: only that many)."""
        versions = [int(v) for v in await self._r.zrange(self._k.evals(job_id), -newest, -1)]
        if not versions:
            return []
        pipe = self._r.pipeline(transaction=False)
        for v in versions:
            pipe.hgetall(self._k.evaluation(job_id, v))
        hashes = await pipe.execute()
        return [evaluation_from_hash(v, h) for v, h in zip(versions, hashes, strict=True) if h]

    async def asked(self, job_id: str, version: int, n: int = 1) -> None:
        await self._r.hincrby(self._k.evaluation(job_id, version), "asked", n)

    async def close(self, job_id: str, version: int, now: float, min_reports: int) -> bool:
        """Close an open evaluation (``complete`` iff it has ``min_reports``)."""
        key = self._k.evaluation(job_id, version)
        return bool(await self._close(keys=[key], args=[repr(now), min_reports]))

    async def fold_eval(
        self, rec: TaskRecord, r: EvalReport, *, min_reports: int, now: float
    ) -> Folded:
        ints: list[Any] = ["examples", r.num_examples, "correct", r.correct]
        for i, (e, c) in enumerate(zip(r.class_examples, r.class_correct, strict=True)):
            ints += [f"ce.{i}", e, f"cc.{i}", c]
        floats: list[Any] = ["loss_sum", repr(float(r.loss_sum))]
        jid, v = rec.job_id, rec.model_version
        return await self._run_fold(rec, "eval", self._k.evaluation(jid, v), ints, floats,
                                    min_reports, now, add_device=True,
                                    devices=self._k.eval_devices(jid, v))  # fmt: skip

    # ------------------------------------------------------------------ statistics phase
    async def open_stats(self, job_id: str, now: float) -> None:
        await self._r.hsetnx(self._k.fedstats(job_id), "opened_ts", repr(now))

    async def stats(self, job_id: str) -> tuple[FeatureStats, bool] | None:
        """The phase's sums and whether it was closed (None: not opened)."""
        h: dict[str, str] = await self._r.hgetall(self._k.fedstats(job_id))
        if not h:
            return None
        n = sum(1 for k in h if k.startswith("fsum."))
        rows = {k[6:]: int(v) for k, v in h.items() if k.startswith("label.")}
        devs = {k[9:]: int(v) for k, v in h.items() if k.startswith("labeldev.")}
        st = FeatureStats(
            reports=int(h.get("reports") or 0), rows=int(h.get("rows") or 0),
            feature_sum=tuple(float(h.get(f"fsum.{i}") or 0.0) for i in range(n)),
            feature_sumsq=tuple(float(h.get(f"fsq.{i}") or 0.0) for i in range(n)),
            label_rows=rows, label_devices=devs, opened_ts=float(h.get("opened_ts") or 0.0),
        )  # fmt: skip
        return st, "closed_ts" in h

    async def stats_reporters(self, job_id: str) -> set[str]:
        return set(await self._r.smembers(self._k.fedstats_devices(job_id)))

    async def close_stats(self, job_id: str, now: float) -> bool:
        return bool(await self._r.hsetnx(self._k.fedstats(job_id), "closed_ts", repr(now)))

    async def fold_stats(self, rec: TaskRecord, r: StatsReport, *, now: float) -> Folded:
        ints: list[Any] = ["rows", r.num_rows]
        for label, k in r.label_counts.items():
            ints += [f"label.{label}", k, f"labeldev.{label}", 1]
        floats: list[Any] = []
        for i, (s, sq) in enumerate(zip(r.feature_sum, r.feature_sumsq, strict=True)):
            floats += [f"fsum.{i}", repr(float(s)), f"fsq.{i}", repr(float(sq))]
        return await self._run_fold(rec, "stats", self._k.fedstats(rec.job_id), ints, floats,
                                    0, now, add_device=True)  # fmt: skip

    async def _run_fold(
        self, rec: TaskRecord, kind: str, agg: str, ints: list[Any], floats: list[Any],
        min_reports: int, now: float, *, add_device: bool, devices: str = "",
    ) -> Folded:  # fmt: skip
        k = self._k
        res = await self._fold(
            keys=[k.task(rec.task_id), k.side_leases(rec.job_id), agg,
                  devices or k.fedstats_devices(rec.job_id)],
            args=[kind, repr(now), min_reports, rec.device_id, "1" if add_device else "0",
                  len(ints) // 2, *ints, *floats],
        )  # fmt: skip
        return _outcome(res)
