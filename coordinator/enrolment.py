"""Device enrolment and revocation: one-use enrolment tokens in, per-device credentials out.

An operator asks for enrolment tokens (``POST /v1/enrolment-tokens``, admin token): each is
256 random bits, valid for ``ttl_s``, usable once, optionally bound to one device id, and
kept only as its sha256. A device trades one for its own credential (``POST /v1/enrol``):
the coordinator mints a password (256 random bits), has the broker let the device in with
it (``BrokerAdmin.enrol``: Mosquitto's dynamic-security plugin confines the id to
``fleet/<id>/...``), records the password's sha256, and answers the password once. A
revocation (``POST /v1/devices/{id}/revoke``) removes the device from the broker (its live
sessions are cut) and marks the credential revoked.

Redis (one hash slot, ``{enrol}``; ``coordinator.keys``)::

    enroltok:{enrol}:<sha>  hash  expires_ts, device_id ("" = any), label, created_ts,
                                  used_ts, used_by; kept a day past expiry so an expired
                                  token is told apart from an unknown one
    cred:{enrol}:<id>       hash  secret_sha, enrolled_ts, revoked_ts ("" while valid),
                                  revision (its record in the credential journal)
    enrolled:{enrol}        set   ids with a valid credential

Both secrets are random 256-bit strings, so an unsalted sha256 is enough to keep them
useless to someone who reads Redis (there is nothing to guess); they are hashed and
compared (in constant time) as upload tokens are (``coordinator.tasks.token_sha``).
Token and password are never logged.

The consume step is one script (refusals: ``token_unknown``, ``token_used``,
``token_expired``, ``token_device``, ``already_enrolled``); if the broker then fails, the
token is given back (``release``) so the device can try again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from coordinator.broker_admin import BrokerAdmin
from coordinator.cred_journal import CredentialJournal, StoredCredential
from coordinator.errors import EnrolmentRefused, EnrolmentUnavailable, NotFound
from coordinator.fleet import FleetStore
from coordinator.keys import Keys
from coordinator.metrics import CoordinatorMetrics
from coordinator.tasks import token_matches, token_sha
from schemas import dynsec
from schemas.dynsec import DynsecError

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
TOMBSTONE_S = 86400.0  # an expired or used token stays readable this long (its refusal reason)

REFUSALS = ("token_unknown", "token_used", "token_expired", "token_device", "already_enrolled")

# KEYS[1] token hash, KEYS[2] enrolled set; ARGV: device id, now
_CONSUME = """
local h = redis.call('HMGET', KEYS[1], 'expires_ts', 'used_ts', 'device_id')
if not h[1] then return 'token_unknown' end
if h[2] and h[2] ~= '' then return 'token_used' end
if tonumber(h[1]) <= tonumber(ARGV[2]) then return 'token_expired' end
if h[3] and h[3] ~= '' and h[3] ~= ARGV[1] then return 'token_device' end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'already_enrolled' end
redis.call('HSET', KEYS[1], 'used_ts', ARGV[2], 'used_by', ARGV[1])
return 'ok'
"""

# KEYS[1] credential hash, KEYS[2] enrolled set; ARGV: device id, now, revision
_REVOKE = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked_ts', ARGV[2], 'revision', ARGV[3])
return 1
"""


def new_secret() -> str:
    """An enrolment token or a device password: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(TOKEN_BYTES)


class EnrolmentStore:
    """Redis adapter for enrolment tokens and device credentials."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._r: Any = redis
        self._k = Keys(prefix)
        self._consume: Any = redis.register_script(_CONSUME)
        self._revoke: Any = redis.register_script(_REVOKE)
        self._checked: int | None = None  # the check counter after this process's last pass

    async def issue(
        self, count: int, ttl_s: float, *, device_id: str = "", label: str = "",
        now: float | None = None,
    ) -> tuple[list[str], float]:  # fmt: skip
        """``count`` new tokens valid for ``ttl_s``; returns (tokens, expires_ts)."""
        now = time.time() if now is None else now
        expires = now + ttl_s
        tokens = [new_secret() for _ in range(count)]
        pipe = self._r.pipeline(transaction=False)
        for t in tokens:
            key = self._k.enrol_token(token_sha(t))
            fields = {"expires_ts": repr(expires), "device_id": device_id, "label": label,
                      "created_ts": repr(now), "used_ts": ""}  # fmt: skip
            pipe.hset(key, mapping=fields)
            pipe.expire(key, int(ttl_s + TOMBSTONE_S))
        await pipe.execute()
        return tokens, expires

    async def consume(self, token: str, device_id: str, now: float | None = None) -> str:
        """Take ``token`` for ``device_id``: ``"ok"`` or one of ``REFUSALS``."""
        now = time.time() if now is None else now
        got = await self._consume(
            keys=[self._k.enrol_token(token_sha(token)), self._k.enrolled],
            args=[device_id, repr(now)],
        )
        return str(got)

    async def release(self, token: str) -> None:
        """Give a consumed token back (the broker refused or was down: nothing enrolled)."""
        key = self._k.enrol_token(token_sha(token))
        await self._r.hset(key, mapping={"used_ts": "", "used_by": ""})

    async def record(self, device_id: str, password: str, now: float | None = None,
                     *, revision: int = 0) -> float:  # fmt: skip
        """The device holds ``password`` from now on; returns the enrolment time."""
        now = time.time() if now is None else now
        await self.put(StoredCredential(device_id, token_sha(password), now, 0.0, revision))
        return now

    async def put(self, c: StoredCredential) -> None:
        """Write a credential as it is (enrolment, or a restore from the journal)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._k.credential(c.device_id), mapping={
            "secret_sha": c.secret_sha, "enrolled_ts": repr(c.enrolled_ts),
            "revoked_ts": repr(c.revoked_ts) if c.revoked_ts else "",
            "revision": str(c.revision)})  # fmt: skip
        if c.revoked_ts:
            pipe.srem(self._k.enrolled, c.device_id)
        else:
            pipe.sadd(self._k.enrolled, c.device_id)
        await pipe.execute()

    async def revoke(self, device_id: str, now: float | None = None,
                     *, revision: int = 0) -> bool:  # fmt: skip
        """Mark the credential revoked; False when the id held no valid credential."""
        now = time.time() if now is None else now
        keys = [self._k.credential(device_id), self._k.enrolled]
        got = await self._revoke(keys=keys, args=[device_id, repr(now), str(revision)])
        return bool(int(got))

    async def stored(self, device_id: str) -> StoredCredential | None:
        """The credential as Redis holds it (with its journal revision; 0: unrecorded)."""
        h = await self._r.hgetall(self._k.credential(device_id))
        if not h or not h.get("secret_sha"):
            return None
        revoked = h.get("revoked_ts") or ""
        return StoredCredential(device_id, h["secret_sha"], float(h.get("enrolled_ts") or 0.0),
                                float(revoked) if revoked else 0.0,
                                int(h.get("revision") or 0))  # fmt: skip

    async def revisions(self, device_ids: list[str]) -> dict[str, int]:
        """The journal revision of each credential Redis holds among ``device_ids``."""
        pipe = self._r.pipeline(transaction=False)
        for d in device_ids:
            pipe.hmget(self._k.credential(d), "secret_sha", "revision")
        got = await pipe.execute()
        return {d: int(rev or 0) for d, (sha, rev) in zip(device_ids, got, strict=True) if sha}

    async def kept(self) -> bool:
        """True when Redis holds at least what it held at this process's last
        :meth:`checked` (its check counter did not go back or vanish: no wipe, no older
        snapshot since); False on the first call."""
        cur = await self._r.get(self._k.cred_checks)
        return self._checked is not None and cur is not None and int(cur) >= self._checked

    async def checked(self) -> None:
        """Mark the credentials verified against the journal up to now."""
        self._checked = int(await self._r.incr(self._k.cred_checks))

    async def device_ids(self) -> list[str]:
        """Every id Redis holds a credential for (valid or revoked)."""
        head = self._k.credential("")
        return [k[len(head):] async for k in self._r.scan_iter(match=head + "*", count=1000)]

    async def verify(self, device_id: str, password: str) -> bool:
        """True when ``password`` is ``device_id``'s valid credential."""
        sha, revoked = await self._r.hmget(self._k.credential(device_id), "secret_sha",
                                           "revoked_ts")  # fmt: skip
        return not revoked and token_matches(password, sha or "")

    async def enrolled(self, device_ids: list[str]) -> set[str]:
        """The ids among ``device_ids`` that hold a valid credential (one round trip)."""
        if not device_ids:
            return set()
        flags = await self._r.smismember(self._k.enrolled, device_ids)
        return {d for d, f in zip(device_ids, flags, strict=True) if int(f)}

    async def count(self) -> int:
        return int(await self._r.scard(self._k.enrolled))


class Enroller:
    """The enrolment flow over its three stores: tokens and credentials (Redis), the
    broker's credential store (``BrokerAdmin``; None: the broker has none, enrolment is
    unavailable) and the fleet view (probation, forgetting a revoked device)."""

    def __init__(
        self, store: EnrolmentStore, broker: BrokerAdmin | None, fleet: FleetStore,
        metrics: CoordinatorMetrics, *, probation_s: float = 0.0,
        journal: CredentialJournal | None = None,
    ) -> None:  # fmt: skip
        self.store, self.broker, self.fleet = store, broker, fleet
        self.metrics = metrics
        self.probation_s = probation_s
        # the durable record (``coordinator.cred_journal``); None: Redis only (tests)
        self.journal = journal

    async def _journal(self, cred: StoredCredential) -> StoredCredential:
        if self.journal is None:
            return cred
        try:
            return await self.journal.append(cred)
        except Exception as exc:  # Kafka down or refusing: the caller answers 503
            log.warning("credential journal write for %s failed: %s: %s", cred.device_id,
                        type(exc).__name__, exc)  # fmt: skip
            raise EnrolmentUnavailable(
                "journal_error", "the credential journal (Kafka) did not take the record; "
                "try again") from None

    def _broker(self) -> BrokerAdmin:
        if self.broker is None:
            self.metrics.enrolments.labels(outcome="unavailable").inc()
            raise EnrolmentUnavailable(
                "no_broker_admin",
                "this coordinator has no broker credential store: enrolment needs the secure "
                "broker (Mosquitto with the dynamic-security plugin; docs/security.md)",
            )
        return self.broker

    async def issue(self, count: int, ttl_s: float, *, device_id: str = "",
                    label: str = "") -> tuple[list[str], float]:  # fmt: skip
        if device_id:
            _check_id(device_id)
        tokens, expires = await self.store.issue(count, ttl_s, device_id=device_id, label=label)
        self.metrics.enrolment_tokens.inc(len(tokens))
        return tokens, expires

    async def enrol(self, token: str, device_id: str) -> tuple[str, float]:
        """``(password, enrolled_ts)`` for a device presenting a valid enrolment token."""
        broker = self._broker()
        try:
            _check_id(device_id)
        except EnrolmentRefused as exc:
            self.metrics.enrolments.labels(outcome=exc.code).inc()
            raise
        verdict = await self.store.consume(token, device_id)
        if verdict != "ok":
            self.metrics.enrolments.labels(outcome=verdict).inc()
            raise EnrolmentRefused(verdict, _WHY.get(verdict, verdict))
        password = new_secret()
        try:
            await broker.enrol(device_id, password)
        except DynsecError as exc:
            await self.store.release(token)
            self.metrics.enrolments.labels(outcome="broker_error").inc()
            log.warning("enrolment of %s: broker refused or unreachable: %s", device_id, exc)
            raise EnrolmentUnavailable("broker_error", str(exc)) from None
        ts = time.time()
        try:  # the record is durable before the device gets its password
            cred = await self._journal(
                StoredCredential(device_id, token_sha(password), ts, 0.0, 0))
        except EnrolmentUnavailable:
            await self.store.release(token)
            with contextlib.suppress(DynsecError):  # undo: no credential without a record
                await broker.revoke(device_id)
            self.metrics.enrolments.labels(outcome="journal_error").inc()
            raise
        await self.store.put(cred)
        if self.probation_s > 0:
            await self.fleet.probation(device_id, ts + self.probation_s)
        self.metrics.enrolments.labels(outcome="enrolled").inc()
        log.info("device %s enrolled", device_id)
        return password, ts

    async def revoke(self, device_id: str) -> float:
        """Cut ``device_id`` off (broker first, so its sessions end now); returns when."""
        stored = await self.store.stored(device_id)
        if stored is None or stored.revoked_ts:
            raise NotFound("device", f"{device_id} holds no valid credential")
        try:
            await self._broker().revoke(device_id)
        except DynsecError as exc:
            raise EnrolmentUnavailable("broker_error", str(exc)) from None
        now = time.time()  # the revocation is recorded before it is answered
        rec = await self._journal(replace(stored, revoked_ts=now))
        await self.store.revoke(device_id, now, revision=rec.revision)
        await self.fleet.forget(device_id)
        self.metrics.revocations.inc()
        log.info("device %s revoked", device_id)
        return now


_WHY = {
    "token_unknown": "enrolment token is not known",
    "token_used": "enrolment token was already used",
    "token_expired": "enrolment token has expired",
    "token_device": "enrolment token is bound to another device id",
    "already_enrolled": "device id is enrolled; revoke it first to enrol it again",
}


def _check_id(device_id: str) -> str:
    try:
        dynsec.check_device_id(device_id)
    except DynsecError as exc:
        code = "reserved_id" if device_id in dynsec.RESERVED_USERNAMES else "bad_id"
        raise EnrolmentRefused(code, str(exc)) from None
    return device_id
