"""One job's slice on one shard: its strategy, counters, bases and announcement cadence.

:class:`JobShard` is what :class:`aggregator.shard.PartitionState` keeps per job;
:class:`Cadence` decides regular announcements from the records alone (stream time);
:class:`PendingVersion` is a snapshot to announce. Pure, no I/O but the optional blob
loader of the base tier (``aggregator.bases``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import zstandard

from aggregator.bases import BaseTier, BlobLoader, SeenFloor, as_slice
from aggregator.checkpoint import JobShardCheckpoint
from aggregator.strategies import (
    FedAsync,
    StrategyOptions,
    StrategyState,
    Wrapper,
    build_strategy,
)
from aggregator.strategies.base import Strategy
from schemas.artifact import initial_params
from schemas.messages import JobSpec, ShardUpdate, ShardVersion
from schemas.types import F32

log = logging.getLogger("fedfleet.aggregator")


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingVersion:
    """A version to announce; :meth:`build` compresses (thread-safe, releases the GIL)."""

    job_id: str
    model_name: str
    shard: int
    start: int
    stop: int
    version: int
    raw: bytes  # float32 little-endian slice
    updates_applied: int
    updates_rejected: int
    mean_staleness: float
    level: int = -1

    def build(self, ts: float | None = None) -> ShardVersion:
        return ShardVersion(
            job_id=self.job_id,
            model_name=self.model_name,
            shard=self.shard,
            start=self.start,
            stop=self.stop,
            version=self.version,
            params=zstandard.ZstdCompressor(level=self.level).compress(self.raw),
            updates_applied=self.updates_applied,
            updates_rejected=self.updates_rejected,
            mean_staleness=self.mean_staleness,
            ts=ts if ts is not None else time.time(),
        )


@dataclass(slots=True, kw_only=True)
class Cadence:
    """When a job shard announces: ``publish_every`` versions AND ``min_interval_s`` of
    stream time since the last regular announcement (``0`` s = versions only).

    ``clock`` is the running max of applied records' ``accepted_ts``; ``last_version`` /
    ``last_ts`` are the version and clock of the last *regular* announcement. Idle
    announcements do not move them, so the regular schedule depends on the records alone.
    """

    publish_every: int
    min_interval_s: float = 0.0
    clock: float = 0.0
    last_version: int = 0
    last_ts: float = 0.0

    def tick(self, ts: float) -> None:
        self.clock = max(self.clock, ts)

    def due(self, version: int) -> bool:
        return version - self.last_version >= self.publish_every and (
            self.min_interval_s <= 0.0 or self.clock - self.last_ts >= self.min_interval_s
        )

    def announced(self, version: int) -> None:
        self.last_version, self.last_ts = version, self.clock


class JobShard:
    """One job's slice on this shard: its strategy, counters and publication cadence.

    Exact FedAsync keeps its announced slices in a bounded in-memory history backed by
    :class:`aggregator.bases.BaseTier` (blobs in the checkpoint store, named by ``key``),
    so an acknowledged update finds its base however far behind it is; ``load_blob`` reads
    those blobs.
    """

    def __init__(
        self,
        job: JobSpec,
        shard: int,
        *,
        publish_every: int,
        options: StrategyOptions,
        min_publish_interval_s: float = 0.0,
        key: str = "",
        load_blob: BlobLoader | None = None,
        seen_window_s: float = 600.0,
        artifact: bytes | None = None,
    ) -> None:
        self.job = job
        self.shard = shard
        self.key = key
        self.start = job.shard_bounds[shard]
        self.stop = job.shard_bounds[shard + 1]
        self.publish_every = publish_every
        self.cadence = Cadence(publish_every=publish_every, min_interval_s=min_publish_interval_s)
        # version 0: the built-in family's generator, or the onnx artifact's initializers
        init = initial_params(job.spec, job.init_seed, artifact)[self.start : self.stop]
        opts = StrategyOptions(
            history_size=options.history_size,
            keep_every=0,  # history = exactly the announced versions (mark_published)
            robust=options.robust,
            trim_ratio=options.trim_ratio,
            dp_noise_multiplier=options.dp_noise_multiplier,
            dp_seed=options.dp_seed,
            bound_staleness=False,  # the coordinator bounds staleness before it acks
        )
        self.strategy: Strategy = build_strategy(job.strategy, init, options=opts)
        self.bases = BaseTier(self.blob_key, load_blob)
        self.seen = SeenFloor(seen_window_s)
        core = self.strategy.unwrap() if isinstance(self.strategy, Wrapper) else self.strategy
        if isinstance(core, FedAsync) and job.strategy.name == "fedasync":
            core.history.on_evict = self.bases.evicted
            core.history.fallback = self.bases.get
        self.applied = 0
        self.rejected = 0
        self.staleness_sum = 0.0
        self.last_published = -1  # newest announced version (regular or idle)

    @property
    def version(self) -> int:
        return self.strategy.version

    @property
    def params(self) -> F32:
        return self.strategy.params

    def should_publish(self, version: int) -> bool:
        """Regular cadence: is ``version`` (just produced) due for announcement?"""
        return version > self.last_published and self.cadence.due(version)

    @property
    def unannounced(self) -> bool:
        return self.version > self.last_published

    def mark_published(self, *, regular: bool) -> None:
        """Announce the current version: keep it as a possible base, move the cadence."""
        self.last_published = self.version
        if regular:
            self.cadence.announced(self.version)
        self.strategy.mark_published()

    def pending_version(self, *, level: int = -1) -> PendingVersion:
        """A snapshot of the current slice, to be compressed into a ``ShardVersion``."""
        mean = self.staleness_sum / self.applied if self.applied else 0.0
        return PendingVersion(
            job_id=self.job.job_id,
            model_name=self.job.model_name,
            shard=self.shard,
            start=self.start,
            stop=self.stop,
            version=self.version,
            raw=np.ascontiguousarray(self.params, dtype="<f4").tobytes(),
            updates_applied=self.applied,
            updates_rejected=self.rejected,
            mean_staleness=mean,
            level=level,
        )

    def shard_version(self, *, ts: float | None = None, level: int = -1) -> ShardVersion:
        """The current slice as a ``ShardVersion`` (params = zstd of float32 LE)."""
        return self.pending_version(level=level).build(ts=ts)

    def blob_key(self, version: int) -> str:
        return f"{self.key}.{self.job.job_id}.h{version}"

    def observe(self, msg: ShardUpdate) -> None:
        """Note an acknowledged record (keeps the bases later records may still name)."""
        self.seen.observe(msg.accepted_ts, msg.seen_version)

    def checkpoint(self) -> tuple[JobShardCheckpoint, dict[str, bytes], list[str]]:
        """The job's checkpoint plus history blobs to write and obsolete blobs to delete.

        Announced slices are immutable, so each is stored once as its own blob and the
        checkpoint lists their versions (``history``: in memory, loaded on restore;
        ``cold``: read on demand): a checkpoint stays ~one slice, however many bases are
        kept. Call :meth:`saved` once it is durable.
        """
        st = self.strategy.get_state()
        hist = {int(k[5:]): v for k, v in st.arrays.items() if k.startswith("hist:")}
        arrays = {
            k: v.astype("<f4").tobytes() for k, v in st.arrays.items() if not k.startswith("hist:")
        }
        low = self.seen.lowest()
        floor = None if low is None else low - self.job.strategy.max_staleness
        new, obsolete, cold = self.bases.plan(hist, floor, self.last_published)
        ckpt = JobShardCheckpoint(
            job_id=self.job.job_id,
            start=self.start,
            stop=self.stop,
            version=st.version,
            params=st.params.astype("<f4").tobytes(),
            arrays=arrays,
            scalars=dict(st.scalars),
            applied=self.applied,
            rejected=self.rejected,
            staleness_sum=self.staleness_sum,
            last_published=self.last_published,
            history=sorted(hist),
            cold=cold,
            seen=self.seen.entries(),
            cadence_version=self.cadence.last_version,
            cadence_ts=self.cadence.last_ts,
            clock=self.cadence.clock,
        )
        return ckpt, new, obsolete

    def saved(self) -> None:
        self.bases.saved()

    def restore(self, ck: JobShardCheckpoint, history: dict[int, bytes]) -> None:
        arrays = {k: as_slice(v) for k, v in ck.arrays.items()}
        arrays.update({f"hist:{v}": as_slice(b) for v, b in history.items()})
        params = as_slice(ck.params)
        self.strategy.set_state(StrategyState(ck.version, params, arrays, dict(ck.scalars)))
        self.applied, self.rejected = ck.applied, ck.rejected
        self.staleness_sum, self.last_published = ck.staleness_sum, ck.last_published
        c = self.cadence
        c.last_version = ck.last_published if ck.cadence_version is None else ck.cadence_version
        c.last_ts, c.clock = ck.cadence_ts, ck.clock
        self.bases.restore(set(history) | set(ck.cold))
        self.seen = SeenFloor(self.seen.window_s, [(t, v) for t, v in ck.seen])
