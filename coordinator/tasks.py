"""Task leases in Redis: offered -> accepted -> uploaded / expired / aborted / declined.

Keys (named in ``coordinator.keys``)::

    {p}{t}task:{task_id} hash   job_id, device_id, token_sha, state, issued_ts, deadline_ts,
                                update_id, reissue_of, round (sync rounds only)
    {p}{t}leases:{job}   zset   task_id -> deadline for tasks offered/accepted/uploading
    {p}{t}sideleases:{job} zset  the same for ``eval``/``stats`` tasks (``kind``): they take
                                no training slot (``active_count`` counts training only)
    {p}{t}round:{job}    hash   the open sync round (``rounds.RoundStore``); ``taken``
                                counts the uploads it admitted (``claim_in_round``)

Transitions are atomic (a Lua script checks the current state); the upload token is
stored only as its SHA-256 and compared in constant time. The token itself is never
stored or produced anywhere: it is ``derive_token(task_key, task_id)`` (HMAC-SHA256 under
the deployment's task key, ``load_task_key``), recomputed by the dispatcher right before
it pushes the task to the device's own MQTT topic. An upload's confirm
(``confirm_upload``) is one script: task ``uploaded``, lease dropped, the device released
(the ``FleetStore.release_task`` bookkeeping) and the job's counters bumped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis

from coordinator.errors import CoordinatorError
from coordinator.fleet import HISTORY, frac
from coordinator.keys import Keys
from schemas.atomic import sync_dir

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

# An accepted upload's confirm, in one step (KEYS: task, leases, jobstats, sels, dev, hist,
# contrib; ARGV: uploaded_ts, device, task, outcome, history ts, contribution ts, the
# device's fraction, late 1/0, history length). The task must be ``uploading``; the
# device's packed state ``task|cooldown|contributions|today|day`` is released as
# ``FleetStore.release_task(contributed=True)`` would (junk reads as the defaults).
_CONFIRM_UPLOAD = """
local cur = redis.call('HGET', KEYS[1], 'state')
if cur ~= 'uploading' then return cur or '' end
redis.call('HSET', KEYS[1], 'state', 'uploaded', 'uploaded_ts', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
local t, cool, n, today, day = '', '0.0', 0, '0', '0'
local raw = redis.call('HGET', KEYS[4], ARGV[2])
if raw then
  local p = {}
  for part in string.gmatch(raw .. '|', '([^|]*)|') do p[#p + 1] = part end
  local int = '^%-?%d+$'
  if #p == 5 and tonumber(p[2]) and string.match(p[3], int) and string.match(p[4], int)
     and string.match(p[5], int) then
    t, cool, n, today, day = p[1], p[2], tonumber(p[3]), p[4], p[5]
  end
end
if t == ARGV[3] then t = '' end
n = n + 1
redis.call('HSET', KEYS[4], ARGV[2], t .. '|' .. cool .. '|' .. string.format('%d', n) .. '|'
           .. today .. '|' .. day)
redis.call('HSET', KEYS[5], 'last_contribution_ts', ARGV[6])
redis.call('ZADD', KEYS[7], string.format('%.17g', n + tonumber(ARGV[7])), ARGV[2])
redis.call('LPUSH', KEYS[6], ARGV[5] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[9]) - 1)
redis.call('HINCRBY', KEYS[3], 'updates_accepted', 1)
if ARGV[8] == '1' then redis.call('HINCRBY', KEYS[3], 'late_updates', 1) end
return 'OK:uploading'
"""


def deployment_tag(topic_prefix: str) -> str:
    """Six hex digits naming a deployment (its topic prefix) inside its task ids."""
    return hashlib.sha256(topic_prefix.encode()).hexdigest()[:6]


def new_task_id(tag: str) -> str:
    """``t-<deployment tag>-<64 random bits>``: a coordinator can tell a task of another
    deployment on the same broker from one it lost (``foreign_task``)."""
    return f"t-{tag}-{secrets.token_hex(8)}"


def foreign_task(task_id: str, tag: str) -> bool:
    """True when ``task_id`` was issued by another deployment (ids of the old form
    ``t-<hex>``, without a tag, are judged as this deployment's)."""
    parts = task_id.split("-")
    return len(parts) == 3 and parts[0] == "t" and len(parts[1]) == 6 and parts[1] != tag


TASK_KEY_BYTES = 32


def derive_token(key: bytes, task_id: str) -> str:
    """The one-use upload token of ``task_id``: base64url (no padding) of
    HMAC-SHA256(``key``, ``task_id``). Every coordinator holding the deployment's task key
    computes the same token, so none is ever stored or sent through Kafka."""
    if len(key) != TASK_KEY_BYTES:
        raise ValueError(f"a task key has {TASK_KEY_BYTES} bytes, got {len(key)}")
    mac = hmac.new(key, task_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def load_task_key(path: Path) -> bytes:
    """The task key in ``path`` (32 raw bytes, owner-only), created (mode 0600) when absent.
    Creation never replaces a key another coordinator wrote first (hard link of a fully
    written temp file), so coordinators starting together end up with one key. A file that
    group or others can access, of the wrong length, or unreadable is a ``CoordinatorError``
    (code ``task_key``) that says so."""
    path = Path(path)
    try:
        if not path.exists():
            _create_key(path, secrets.token_bytes(TASK_KEY_BYTES))
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(TASK_KEY_BYTES + 1)
    except OSError as exc:
        raise CoordinatorError("task_key", f"cannot use task key {path}: {exc}") from None
    if st.st_mode & 0o077:
        raise CoordinatorError("task_key", f"task key {path} is accessible by group or others "
                               f"(mode {st.st_mode & 0o777:o}): chmod 600 it")  # fmt: skip
    if len(raw) != TASK_KEY_BYTES:
        raise CoordinatorError("task_key", f"task key {path} has {max(len(raw), st.st_size)} "
                               f"bytes, a task key has {TASK_KEY_BYTES}")  # fmt: skip
    return raw


def _create_key(path: Path, key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never over a key that is already there
        except FileExistsError:
            pass  # another coordinator created it first: use theirs
    finally:
        Path(tmp).unlink(missing_ok=True)
    sync_dir(path.parent)


def token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_sha: str) -> bool:
    return hmac.compare_digest(token_sha(token), stored_sha)


def _int(v: str | None, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def issued_field(kind: str) -> str:
    """The job-stats counter of issued tasks of ``kind`` (training: ``tasks_issued``)."""
    return "tasks_issued" if kind == "train" else f"tasks_{kind}_issued"


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
    kind: str = "train"  # Task.task_kind: train / eval / stats
    model_version: int = -1  # eval: the version to score

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
            kind=h.get("kind", "train") or "train",
            model_version=_int(h.get("model_version"), -1),
        )


class TaskStore:
    def __init__(self, redis: Redis, prefix: str, *, keep_s: float = 7 * 86400) -> None:
        """``keep_s``: how long a task record outlives its creation (a late resend of its
        upload still finds it: ``duplicate``, not ``unknown_task``); task records are most
        of Redis's bytes in a large fleet (docs/scaling.md), so it is a setting
        (``CoordinatorSettings.task_record_ttl_s``)."""
        self._r: Any = redis  # Redis, decode_responses=True (redis-py types bytes | str)
        self._k = Keys(prefix)
        self._keep_s = keep_s
        self._transition = redis.register_script(_TRANSITION)
        self._claim_in_round = redis.register_script(_CLAIM_IN_ROUND)
        self._confirm = redis.register_script(_CONFIRM_UPLOAD)

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
        kind: str = "train",
        model_version: int = -1,
        keep_s: float | None = None,
    ) -> None:
        """A new ``offered`` task with its lease. ``eval``/``stats`` tasks (``kind``) lease
        in ``side_leases`` and count in ``tasks_<kind>_issued``: no training slot."""
        mapping = {
            "task_id": task_id, "job_id": job_id, "device_id": device_id,
            "token_sha": token_sha(token), "state": "offered",
            "issued_ts": repr(issued_ts), "deadline_ts": repr(deadline_ts),
            "reissue_of": reissue_of,
        }  # fmt: skip
        if round_no:
            mapping["round"] = str(round_no)
        if kind != "train":
            mapping["kind"] = kind
            mapping["model_version"] = str(model_version)
        k = self._k
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(k.task(task_id), mapping=mapping)
        pipe.expire(k.task(task_id), int(self._keep_s if keep_s is None else keep_s))
        pipe.zadd(self._lease_key(job_id, kind), {task_id: deadline_ts})
        pipe.hincrby(k.jobstats(job_id), issued_field(kind), 1)
        await pipe.execute()

    def _lease_key(self, job_id: str, kind: str) -> str:
        return self._k.leases(job_id) if kind == "train" else self._k.side_leases(job_id)

    async def get(self, task_id: str) -> TaskRecord | None:
        h = await self._r.hgetall(self._k.task(task_id))
        return TaskRecord.from_hash(h) if h else None

    async def transition(
        self, rec: TaskRecord, to: str, frm: tuple[str, ...], **fields: str
    ) -> tuple[bool, str]:
        """Move ``rec`` to ``to`` if its current state is in ``frm``; returns (ok, previous)."""
        args: list[str] = [to, str(len(frm)), *frm]
        for k, v in fields.items():
            args += [k, v]
        res = await self._transition(
            keys=[self._k.task(rec.task_id), self._lease_key(rec.job_id, rec.kind)], args=args
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
            keys=[self._k.task(rec.task_id), self._k.leases(rec.job_id), self._k.round(rec.job_id)],
            args=[update_id, repr(now)],
        )
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res.startswith("OK:"):
            return "ok", res[3:]
        if res.startswith("CLOSED:"):
            return "round_closed", res[7:]
        return "moved", res

    async def confirm_upload(self, rec: TaskRecord, now: float, *, late: bool) -> bool:
        """``uploading`` -> ``uploaded`` in one script, with the device released (current
        task cleared, contributions + 1, history ``uploaded``/``late_upload``, last
        contribution time, ``contrib`` score) and ``updates_accepted`` (+ ``late_updates``)
        bumped. False: the task was not ``uploading`` (a concurrent retry confirmed it)."""
        k, dev, ts = self._k, rec.device_id, time.time()
        res = await self._confirm(
            keys=[k.task(rec.task_id), k.leases(rec.job_id), k.jobstats(rec.job_id), k.sels,
                  k.device(dev), k.history(dev), k.contrib],
            args=[repr(now), dev, rec.task_id, "late_upload" if late else "uploaded",
                  f"{ts:.3f}", repr(ts), repr(frac(dev)), "1" if late else "0", HISTORY],
        )  # fmt: skip
        res = res.decode() if isinstance(res, bytes) else str(res)
        return res.startswith("OK:")

    async def active_count(self, job_id: str) -> int:
        return int(await self._r.zcard(self._k.leases(job_id)))

    async def leased(self, job_id: str) -> list[str]:
        """Task ids holding a lease of ``job_id``."""
        return list(await self._r.zrange(self._k.leases(job_id), 0, -1))

    async def drop_lease(self, job_id: str, task_id: str, kind: str = "train") -> None:
        await self._r.zrem(self._lease_key(job_id, kind), task_id)

    async def expired(self, job_id: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return list(await self._r.zrangebyscore(self._k.leases(job_id), "-inf", now))

    async def side_leased(self, job_id: str) -> list[tuple[str, float]]:
        """Active ``eval``/``stats`` tasks of ``job_id`` with their deadlines."""
        got = await self._r.zrange(self._k.side_leases(job_id), 0, -1, withscores=True)
        return [(t, float(d)) for t, d in got]
