"""The job-stats hash ``{p}{t}jobstats:{job}``: one store owns its layout.

Fields (all integers)::

    tasks_issued, tasks_expired, tasks_declined, tasks_aborted, tasks_round_closed
    updates_accepted, updates_rejected, updates_<reason>, late_updates
    rounds_opened_{advanced,short,grace,untracked}
    shard.{s}.version, shard.{s}.applied, shard.{s}.rejected, shard.{s}.staleness_milli
    updates_applied        the fewest any shard applied (applied on every shard)
    mean_staleness_milli   mean over the shards that reported

Counters that move together with a task transition (``tasks_issued`` on create,
``updates_accepted``/``late_updates`` on an upload's confirm) are bumped inside the task
store's atomic step; everything else goes through :class:`JobStatsStore`.
"""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis

from coordinator.keys import Keys
from schemas.messages import ShardVersion


class JobStatsStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._r: Redis = redis  # decode_responses=True
        self._k = Keys(prefix)

    async def bump(self, job_id: str, field: str, n: int = 1) -> int:
        """Add ``n`` to ``field``; returns the new value."""
        return int(await self._r.hincrby(self._k.jobstats(job_id), field, n))

    async def get(self, job_id: str, field: str) -> int:
        v = await self._r.hget(self._k.jobstats(job_id), field)
        return int(v) if v else 0

    async def bump_many(self, job_id: str, *fields: str) -> None:
        """Add 1 to each of ``fields`` in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for f in fields:
            pipe.hincrby(self._k.jobstats(job_id), f, 1)
        await pipe.execute()

    async def stats(self, job_id: str) -> dict[str, int]:
        h = cast(dict[str, str], await self._r.hgetall(self._k.jobstats(job_id)))
        return {k: int(v) for k, v in h.items()}

    async def record_shard(self, sv: ShardVersion, shards: int) -> None:
        """Per-shard figures of one shard event (``shard.{s}.*``) and the job's:
        ``updates_applied`` = the fewest any of the ``shards`` applied (an update counts
        once every shard applied it), ``mean_staleness_milli`` over the shards."""
        key = self._k.jobstats(sv.job_id)
        p = f"shard.{sv.shard}."
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping={
            p + "version": sv.version,
            p + "applied": sv.updates_applied,
            p + "rejected": sv.updates_rejected,
            p + "staleness_milli": int(1000 * sv.mean_staleness),
        })  # fmt: skip
        pipe.hgetall(key)
        _, h = await pipe.execute()
        applied = [int(h.get(f"shard.{i}.applied", 0)) for i in range(shards)]
        stale = [int(v) for k, v in h.items() if k.endswith(".staleness_milli")]
        await self._r.hset(key, mapping={
            "updates_applied": min(applied, default=0),
            "mean_staleness_milli": sum(stale) // max(len(stale), 1),
        })  # fmt: skip
