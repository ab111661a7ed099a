"""Per-partition checkpoints: format, and stores (filesystem by default, in-memory for tests).

A checkpoint covers one ``fl.updates`` partition (= one shard index) across all jobs: each
job's slice, version, strategy extras (buffer, momentum), counters, the versions of its
history slices, plus the partition's next offset and window of applied update ids. It is
written atomically, so state and offsets always agree. History slices are immutable and
stored once each as their own blob (written before the checkpoint that lists them, deleted
after the checkpoint that no longer does).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import msgspec

from aggregator.errors import CheckpointError
from schemas.atomic import atomic_write

FORMAT = 1


class JobShardCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    start: int
    stop: int
    version: int
    params: bytes  # float32 little-endian
    arrays: dict[str, bytes] = {}
    scalars: dict[str, float] = {}
    applied: int = 0
    rejected: int = 0
    staleness_sum: float = 0.0
    last_published: int = -1
    history: list[int] = []  # versions stored as separate immutable blobs, kept in memory
    cold: list[int] = []  # further announced versions stored as blobs, read on demand
    seen: list[tuple[float, int]] = []  # aggregator.bases.SeenFloor window (ts, seen)
    # announcement cadence (shard.Cadence); None in checkpoints written before it existed
    cadence_version: int | None = None  # version of the last regular announcement
    cadence_ts: float = 0.0  # stream clock at that announcement
    clock: float = 0.0  # stream clock: max accepted_ts applied so far


class PartitionCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FORMAT
    topic: str
    partition: int
    next_offset: int
    jobs: list[JobShardCheckpoint] = []
    applied_ids: list[str] = []  # oldest first
    rejected: dict[str, int] = {}


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(PartitionCheckpoint)


def dumps(ckpt: PartitionCheckpoint) -> bytes:
    return _enc.encode(ckpt)


def loads(data: bytes) -> PartitionCheckpoint:
    try:
        ckpt = _dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CheckpointError(f"corrupt checkpoint: {exc}") from None
    if ckpt.format != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {ckpt.format}")
    return ckpt


class CheckpointStore(Protocol):
    """Where checkpoints live; ``save`` must be atomic (all or nothing)."""

    def load(self, key: str) -> bytes | None: ...

    def save(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class MemoryCheckpointStore:
    """In-process store (tests, benchmarks)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def load(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    def save(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)

    def delete(self, key: str) -> None:
        self.blobs.pop(key, None)


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class FileCheckpointStore:
    """One file per key under ``root``: write temp file, fsync, rename, fsync directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / (_SAFE.sub("_", key) + ".ckpt")

    def load(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path(key)}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot delete {self.path(key)}: {exc}") from exc

    def save(self, key: str, data: bytes) -> None:
        final = self.path(key)
        try:
            atomic_write(final, data)
        except OSError as exc:
            raise CheckpointError(f"cannot write {final}: {exc}") from exc
