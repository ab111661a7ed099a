"""Storage of the synchronous-round state machine: ``{p}{t}round:{job}``, one hash per job.

Fields: ``round``, ``started``, ``deadline``, ``target`` (uploads that fill it), ``taken``
(uploads it admitted: incremented atomically by ``TaskStore.claim_in_round``, never past
``target``), ``invited``, ``carry``, ``versions0``, ``closed``. The decisions are in
``policy`` (pure) and ``selector.Selector.sync_round``; this module only reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from redis.asyncio import Redis

from coordinator.keys import Keys


class RoundStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._r: Redis = redis  # decode_responses=True
        self._k = Keys(prefix)

    async def get(self, job_id: str) -> dict[str, str]:
        """The job's round hash ({} before its first round)."""
        h = cast(dict[str, str], await self._r.hgetall(self._k.round(job_id)))
        return h

    async def write(self, job_id: str, mapping: Mapping[str, Any]) -> None:
        """Replace the round hash with ``mapping`` (empty: delete it), atomically."""
        key = self._k.round(job_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(key)
        if mapping:
            pipe.hset(key, mapping={k: str(v) for k, v in mapping.items()})
        await pipe.execute()

    async def close(self, job_id: str, now: float) -> int:
        """Mark the round closed and read its final ``taken`` in one ``MULTI``: from here
        on ``claim_in_round`` admits no upload, so the count cannot move any more."""
        key = self._k.round(job_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, "closed", repr(now))
        pipe.hget(key, "taken")
        _, taken = await pipe.execute()
        return int(taken or 0)

    async def set_invited(self, job_id: str, n: int) -> None:
        await self._r.hset(self._k.round(job_id), "invited", n)
