"""The credential journal: the durable record of every device credential, so that a
coordinator which finds Redis empty or rolled back lets its enrolled fleet in again.

Without it a Redis wipe forgets every enrolment while the broker still holds the devices'
passwords: every enrolled device's telemetry is then refused ``not_enrolled`` and its HTTP
uploads 401, for good. Each enrolment and revocation is written here (acks=all) before the
device or the operator gets an answer, then to Redis; ``restore_lost_credentials`` writes
back whatever Redis lacks or holds at an older revision, at start and every
``recovery_check_s`` (``fedfleet_coord_credentials_restored_total``).

A record holds the device id, the sha256 of its password (a random 256-bit secret: the
hash is useless to a reader, as in Redis), when it enrolled and, if so, when it was
revoked. Enrolment tokens are not journalled: an unused token lost with Redis is issued
again by the operator. Port with two adapters under one contract (``tests/test_cred_journal.py``):

- ``KafkaCredentialJournal``: the compacted topic ``{topic_prefix}credentials`` keyed by
  device id (``coordinator.compacted``);
- ``MemoryCredentialJournal``: a list shared by instances, for tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec

from coordinator.compacted import CompactedTopic, MemoryLog, OnTopic, next_revision
from coordinator.metrics import CoordinatorMetrics
from coordinator.settings import CoordinatorSettings
from schemas.errors import FedfleetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredCredential:
    """A credential record: what Redis holds and what the journal keeps (no secret: the
    password's sha256 only)."""

    device_id: str
    secret_sha: str
    enrolled_ts: float
    revoked_ts: float  # 0.0 while valid
    revision: int  # the journal revision it was written at (0: not journalled)


class CredentialStore(Protocol):
    """What recovery needs of the Redis side (``coordinator.enrolment.EnrolmentStore``)."""

    async def revisions(self, device_ids: list[str]) -> dict[str, int]: ...
    async def put(self, c: StoredCredential) -> None: ...
    async def kept(self) -> bool: ...
    async def checked(self) -> None: ...
    async def device_ids(self) -> list[str]: ...
    async def stored(self, device_id: str) -> StoredCredential | None: ...


class CredentialRecord(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    secret_sha: str
    enrolled_ts: float
    revoked_ts: float = 0.0
    revision: int


def encode_record(c: StoredCredential) -> bytes:
    return msgspec.json.encode(CredentialRecord(
        device_id=c.device_id, secret_sha=c.secret_sha, enrolled_ts=c.enrolled_ts,
        revoked_ts=c.revoked_ts, revision=c.revision))  # fmt: skip


def decode_record(value: bytes) -> StoredCredential:
    r = msgspec.json.decode(value, type=CredentialRecord)
    return StoredCredential(r.device_id, r.secret_sha, r.enrolled_ts, r.revoked_ts, r.revision)


class CredentialJournal(Protocol):
    async def append(self, cred: StoredCredential) -> StoredCredential:
        """Record ``cred`` durably; returns it with its revision (above any before it)."""
        ...

    def latest(self) -> dict[str, StoredCredential]:
        """The newest record of every device read so far."""
        ...

    def take_changed(self) -> set[str]:
        """The devices whose record was read since the last call (cleared)."""
        ...


class _Index:
    def __init__(self) -> None:
        self.creds: dict[str, StoredCredential] = {}
        self.changed: set[str] = set()
        self.bad = 0

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def fold(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            c = decode_record(value)
        except (msgspec.DecodeError, msgspec.ValidationError, FedfleetError, ValueError):
            self.bad += 1  # a record this version cannot read: skipped, counted
            return
        cur = self.creds.get(c.device_id)
        if cur is None or c.revision >= cur.revision:
            self.creds[c.device_id] = c
            self.changed.add(c.device_id)

    def stamped(self, c: StoredCredential) -> StoredCredential:
        cur = self.creds.get(c.device_id)
        return replace(c, revision=next_revision(cur.revision if cur else None))


class MemoryCredentialJournal:
    """In-process journal; instances built over the same ``log`` list see each other."""

    def __init__(self, log: list[bytes] | None = None) -> None:
        self._index = _Index()
        self._log = MemoryLog(log, self._index.fold)
        self.log = self._log.log

    async def append(self, cred: StoredCredential) -> StoredCredential:
        self._log.catch_up()
        c = self._index.stamped(cred)
        self._log.put(encode_record(c))
        return c

    def latest(self) -> dict[str, StoredCredential]:
        self._log.catch_up()
        return dict(self._index.creds)

    def take_changed(self) -> set[str]:
        self._log.catch_up()
        return self._index.take_changed()


class KafkaCredentialJournal(OnTopic):
    """The journal on its compacted topic: ``start`` reads it to its end, ``run`` tails it."""

    def __init__(self, s: CoordinatorSettings, producer: Any) -> None:
        self._index = _Index()
        self.log = CompactedTopic(s, producer, s.credentials_topic, self._index.fold,
                                  name="credentials")  # fmt: skip

    async def append(self, cred: StoredCredential) -> StoredCredential:
        c = self._index.stamped(cred)
        await self.log.put(c.device_id, encode_record(c))
        return c

    def latest(self) -> dict[str, StoredCredential]:
        return dict(self._index.creds)

    def take_changed(self) -> set[str]:
        return self._index.take_changed()


async def restore_lost_credentials(
    journal: CredentialJournal, store: CredentialStore, metrics: CoordinatorMetrics
) -> list[str]:
    """Write back every credential Redis lacks or holds at an older revision; their ids.

    Every record is compared when Redis may have lost or rolled back data since this
    process last checked (``store.kept()`` false: first pass, wipe, older snapshot);
    otherwise only the records read since then, so a quiet pass costs two Redis round
    trips, not one per enrolled device."""
    changed = journal.take_changed()
    latest = journal.latest()
    ids = list(changed) if await store.kept() else list(latest)
    have = await store.revisions(ids) if ids else {}
    restored = []
    for device_id in ids:
        cred = latest[device_id]
        if have.get(device_id, -1) < cred.revision:
            await store.put(cred)
            restored.append(device_id)
    await store.checked()
    if restored:
        metrics.credentials_restored.inc(len(restored))
        log.warning("restored %d device credential(s) from the journal (Redis lacked them "
                    "or held an older revision)", len(restored))  # fmt: skip
    return restored


async def journal_unrecorded_credentials(
    journal: CredentialJournal, store: CredentialStore
) -> list[str]:
    """Credentials Redis holds that the journal does not (enrolled before it existed):
    record them, and mark Redis with the revision."""
    known = journal.latest()
    added = []
    for device_id in await store.device_ids():
        if device_id in known:
            continue
        cred = await store.stored(device_id)
        if cred is None:
            continue
        await store.put(await journal.append(cred))
        added.append(device_id)
    return added
