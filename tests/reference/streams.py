"""Builders for golden tests: jobs, ordered update streams, their wire records and the
reference view of them (decoded deltas). Uses ``schemas`` only, never ``aggregator``."""

from __future__ import annotations

import time
import uuid

import numpy as np

from schemas import codec
from schemas.messages import (
    CodecConfig,
    JobSpec,
    ModelSpecMsg,
    ShardUpdate,
    StrategyConfig,
)
from schemas.modelspec import even_bounds, init_params, num_params
from tests.reference.rules import RefCadence, RefUpdate

LOSSLESS = CodecConfig(topk=0.1, quant="none")
T0 = 1_700_000_000.0  # stream clock origin for streams with a fixed record spacing


def stamp(i: int, ts_step: float | None) -> float:
    """``accepted_ts`` of record ``i``: ``T0 + i * ts_step``, or now when no step is given."""
    return time.time() if ts_step is None else T0 + i * ts_step


def make_job(
    strategy: StrategyConfig,
    *,
    shards: int = 2,
    n_features: int = 20,
    n_classes: int = 3,
    hidden: int = 4,
    publish_every: int = 1,
    job_id: str | None = None,
) -> JobSpec:
    spec = ModelSpecMsg(family="mlp", n_features=n_features, n_classes=n_classes, hidden=hidden)
    return JobSpec(
        job_id=job_id or f"job-{uuid.uuid4().hex[:8]}",
        model_name="m",
        spec=spec,
        shard_bounds=even_bounds(num_params(spec), shards),
        strategy=strategy,
        publish_every=publish_every,
        init_seed=7,
        created_ts=time.time(),
    )


def random_stream(
    job: JobSpec,
    n: int,
    *,
    seed: int = 0,
    max_lag: int = 6,
    dup_every: int = 0,
    history_size: int | None = 16,
    fresh_only: bool = False,
    ts_step: float | None = None,
    min_interval: float = 0.0,
) -> list[tuple[str, int, np.ndarray, int]]:
    """``(update_id, base_version, full delta, num_samples)`` with announced base versions.

    Tracks the version the shard will be at, and which versions it announces (records are
    stamped ``stamp(i, ts_step)`` by :func:`shard_updates`), so base versions stay
    realistic; lags past the history window or the staleness bound produce the occasional
    rejection (``history_size=None``: an aggregator shard, which keeps every announced
    slice and leaves the staleness bound to the coordinator, rejects none).
    """
    rng = np.random.default_rng(seed)
    total = num_params(job.spec)
    every = job.publish_every
    cfg = job.strategy
    buffered = cfg.name in ("fedbuff", "fedavg")
    cur, in_buf = 0, 0
    cad = RefCadence(every, min_interval if ts_step is not None else 0.0)
    out: list[tuple[str, int, np.ndarray, int]] = []
    for i in range(n):
        lag = 0 if fresh_only else int(rng.integers(0, max_lag + 1))
        base = cur if lag == 0 else max(v for v in cad.announced if v <= max(0, cur - lag))
        if history_size is None:
            kept, ok = cad.announced, True
        else:
            kept, ok = cad.announced[-history_size:], cur - base <= cfg.max_staleness
        if cfg.name == "fedasync":
            ok = ok and (base == cur or base in kept)
        delta = (rng.normal(size=total) * 0.1).astype(np.float32)
        out.append((f"u{i}", base, delta, int(rng.integers(1, 50))))
        if ok:
            in_buf += 1
            new: int | None = None
            if not buffered or in_buf == cfg.buffer_size:
                cur, in_buf = cur + 1, 0
                new = cur
            cad.applied(stamp(len(out) - 1, ts_step) if ts_step is not None else 0.0, new)
        if dup_every and i % dup_every == 0:
            out.append(out[-1])
    return out


def shard_updates(
    job: JobSpec,
    stream: list[tuple[str, int, np.ndarray, int]],
    shard: int,
    cfg: CodecConfig = LOSSLESS,
    *,
    ts_step: float | None = None,
) -> list[ShardUpdate]:
    lo, hi = job.shard_bounds[shard], job.shard_bounds[shard + 1]
    return [
        ShardUpdate(
            update_id=uid,
            task_id=f"t-{uid}",
            job_id=job.job_id,
            device_id="d1",
            shard=shard,
            start=lo,
            stop=hi,
            base_version=base,
            num_samples=ns,
            payload=codec.encode(np.ascontiguousarray(delta[lo:hi]), cfg),
            accepted_ts=stamp(i, ts_step),
        )
        for i, (uid, base, delta, ns) in enumerate(stream)
    ]


def ref_stream(updates: list[ShardUpdate]) -> list[RefUpdate]:
    """What the aggregator sees: the decoded (possibly lossy) delta of each record, and
    for a sparse record the coordinates it sent."""
    out = []
    for u in updates:
        chunk = codec.decode(u.payload, u.stop - u.start)
        support = None if chunk.indices is None else chunk.indices.tolist()
        delta = chunk.to_dense().astype(float).tolist()
        out.append(
            RefUpdate(u.update_id, u.base_version, delta, u.num_samples, u.accepted_ts, support)
        )
    return out


def init_slice(job: JobSpec, shard: int) -> list[float]:
    lo, hi = job.shard_bounds[shard], job.shard_bounds[shard + 1]
    out: list[float] = init_params(job.spec, job.init_seed)[lo:hi].astype(float).tolist()
    return out
