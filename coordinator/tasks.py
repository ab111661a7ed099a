"""Task leases in Redis: offered -> accepted -> uploaded / expired / aborted / declined.

Keys (``p`` = ``redis_prefix``)::

    {p}task:{task_id}    hash   job_id, device_id, token_sha, state, issued_ts, deadline_ts,
                                update_id, reissue_of, round (sync rounds only)
    {p}leases:{job_id}   zset   task_id -> deadline for tasks offered/accepted/uploading
    {p}round:{job_id}    hash   the open sync round (written by the selector); ``taken``
                                counts the uploads it admitted (``claim_in_round``)

Transitions are atomic (a Lua script checks the current state); the upload token is
stored only as its SHA-256 and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

ACTIVE = ("offered", "accepted")

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return '' end
local ok = false
for i = 3, 2 + tonumber(ARGV[2]) do
  if ARGV[i] == cur then ok = true end
end
if not ok then return cur end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local n = 3 + tonumber(ARGV[2])
while n + 1 <= #ARGV do
  redis.call('HSET', KEYS[1], ARGV[n], ARGV[n + 1])
  n = n + 2
end
if ARGV[1] ~= 'accepted' and ARGV[1] ~= 'uploading' then
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'task_id'))
end
return 'OK:' .. cur
"""

# Claim a sync-round task for an upload and count it against its round, in one step:
# the task may take a slot only while its round is the open one, not closed, and has
# fewer than ``target`` uploads. Otherwise the task is expired (reason round_closed).
_CLAIM_IN_ROUND = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return '' end
if cur ~= 'offered' and cur ~= 'accepted' then return cur end
local r = redis.call('HMGET', KEYS[3], 'round', 'target', 'taken', 'closed')
local mine = redis.call('HGET', KEYS[1], 'round')
if mine and r[1] == mine and not r[4]
   and tonumber(r[3] or '0') < tonumber(r[2] or '0') then
  redis.call('HINCRBY', KEYS[3], 'taken', 1)
  redis.call('HSET', KEYS[1], 'state', 'uploading', 'update_id', ARGV[1], 'late', 'False')
  return 'OK:' .. cur
end
redis.call('HSET', KEYS[1], 'state', 'expired', 'expired_ts', ARGV[2], 'reason', 'round_closed')
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'task_id'))
return 'CLOSED:' .. cur
"""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_sha: str) -> bool:
    return hmac.compare_digest(token_sha(token), stored_sha)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    job_id: str
    device_id: str
    token_sha: str
    state: str
    issued_ts: float
    deadline_ts: float
    update_id: str = ""
    reissue_of: str = ""
    round_no: int = 0  # sync round the task was issued for (0: async job)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> TaskRecord:
        return cls(
            task_id=h.get("task_id", ""),
            job_id=h.get("job_id", ""),
            device_id=h.get("device_id", ""),
            token_sha=h.get("token_sha", ""),
            state=h.get("state", ""),
            issued_ts=float(h.get("issued_ts", 0) or 0),
            deadline_ts=float(h.get("deadline_ts", 0) or 0),
            update_id=h.get("update_id", ""),
            reissue_of=h.get("reissue_of", ""),
            round_no=int(h.get("round", 0) or 0),
        )


class TaskStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.r: Any = redis  # decode_responses=True: str in, str out
        self.p = prefix
        self._transition = redis.register_script(_TRANSITION)
        self._claim_in_round = redis.register_script(_CLAIM_IN_ROUND)

    def key(self, task_id: str) -> str:
        return f"{self.p}task:{task_id}"

    def leases_key(self, job_id: str) -> str:
        return f"{self.p}leases:{job_id}"

    def round_key(self, job_id: str) -> str:
        return f"{self.p}round:{job_id}"

    async def create(
        self,
        *,
        task_id: str,
        job_id: str,
        device_id: str,
        token: str,
        issued_ts: float,
        deadline_ts: float,
        reissue_of: str = "",
        round_no: int = 0,
        keep_s: float = 7 * 86400,
    ) -> None:
        mapping = {
            "task_id": task_id, "job_id": job_id, "device_id": device_id,
            "token_sha": token_sha(token), "state": "offered",
            "issued_ts": repr(issued_ts), "deadline_ts": repr(deadline_ts),
            "reissue_of": reissue_of,
        }  # fmt: skip
        if round_no:
            mapping["round"] = str(round_no)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(task_id), mapping=mapping)
        pipe.expire(self.key(task_id), int(keep_s))
        pipe.zadd(self.leases_key(job_id), {task_id: deadline_ts})
        pipe.hincrby(f"{self.p}jobstats:{job_id}", "tasks_issued", 1)
        await pipe.execute()

    async def get(self, task_id: str) -> TaskRecord | None:
        h = await self.r.hgetall(self.key(task_id))
        return TaskRecord.from_hash(h) if h else None

    async def transition(
        self, rec: TaskRecord, to: str, frm: tuple[str, ...], **fields: str
    ) -> tuple[bool, str]:
        """Move ``rec`` to ``to`` if its current state is in ``frm``; returns (ok, previous)."""
        args: list[str] = [to, str(len(frm)), *frm]
        for k, v in fields.items():
            args += [k, v]
        res = await self._transition(
            keys=[self.key(rec.task_id), self.leases_key(rec.job_id)], args=args
        )
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res.startswith("OK:"):
            return True, res[3:]
        return False, res

    async def claim_in_round(
        self, rec: TaskRecord, update_id: str, now: float
    ) -> tuple[Literal["ok", "round_closed", "moved"], str]:
        """Claim a sync-round task (``rec.round_no``) for ``update_id``, counted in its round.

        ``ok``: the task is ``uploading`` and holds one of its round's ``target`` slots
        (``taken`` + 1). ``round_closed``: its round is full, closed or over; the task is
        now ``expired`` (reason ``round_closed``) and its lease dropped. ``moved``: the task
        was not offered/accepted any more (the second value is its state; decide again).
        """
        res = await self._claim_in_round(
            keys=[self.key(rec.task_id), self.leases_key(rec.job_id), self.round_key(rec.job_id)],
            args=[update_id, repr(now)],
        )
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res.startswith("OK:"):
            return "ok", res[3:]
        if res.startswith("CLOSED:"):
            return "round_closed", res[7:]
        return "moved", res

    async def active_count(self, job_id: str) -> int:
        return int(await self.r.zcard(self.leases_key(job_id)))

    async def expired(self, job_id: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return list(await self.r.zrangebyscore(self.leases_key(job_id), "-inf", now))

    async def bump(self, job_id: str, field: str, n: int = 1) -> None:
        await self.r.hincrby(f"{self.p}jobstats:{job_id}", field, n)

    async def stats(self, job_id: str) -> dict[str, int]:
        h = await self.r.hgetall(f"{self.p}jobstats:{job_id}")
        return {k: int(v) for k, v in h.items()}
