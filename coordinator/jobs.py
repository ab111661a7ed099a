"""Jobs: the REST request body -> ``JobSpec`` (pure), and the Redis job store.

Request body of ``POST /v1/jobs`` (JSON)::

    {"model_name": "mnist", "spec": {"family": "mlp", "n_features": 64, "n_classes": 10,
     "hidden": 32}, "shards": 4, "strategy": {...StrategyConfig}, "train": {...TrainConfig},
     "codec": {...CodecConfig}, "concurrency": 50, "target_accuracy": 0.9, "init_seed": 0,
     "publish_every": 5, "eligibility": {...EligibilityPolicy},
     "selection": {"mode": "async"|"sync", "over_selection": 1.3, "round_deadline_s": 120},
     "stop": {...StopConfig}, "evaluation": {...EvalConfig},
     "standardize": false, "job_id": optional}

``spec`` may name ``labels`` (class names in index order: devices' string labels map to
them); ``input_mean``/``input_std`` are fixed by a ``standardize`` job's statistics phase.

``stop`` (0 = no limit) ends the job ``completed`` once that many updates are applied on
every shard or that many seconds passed since it was created, or on its federated
evaluations (``target_accuracy`` held ``target_hold`` times, a ``plateau_window``); its
newest version is pinned. A ``standardize`` job may not set ``spec.input_mean``.

A ``sync`` job with the ``fedavg`` strategy must have ``concurrency == strategy.buffer_size``
(the round size ``K``; ``policy.check_sync_round_size``).

Robust aggregation is on by default: a ``strategy`` that names neither ``clip_norm`` nor
``clip_multiplier`` gets ``clip_multiplier = DEFAULT_CLIP_MULTIPLIER`` (each shard clips an
update's slice to that many times the median of recent slice norms; docs/aggregator.md,
"Clipping"). ``"clip_multiplier": 0`` turns it off; a fixed ``clip_norm`` alone replaces
it. The value is written into the stored ``JobSpec``, so changing the default later does
not change running jobs.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis

from coordinator.errors import JobError, NotFound
from coordinator.evaluation import Evaluation
from coordinator.keys import Keys
from coordinator.policy import (
    EligibilityPolicy,
    SelectionConfig,
    StopConfig,
    check_sync_round_size,
)
from coordinator.standardize import job_phase
from schemas.errors import SchemaError
from schemas.messages import (
    UPDATE_MAX_BYTES,
    CodecConfig,
    EvalConfig,
    JobSpec,
    ModelSpecMsg,
    StrategyConfig,
    TrainConfig,
)
from schemas.modelspec import even_bounds, num_params

JOB_FIELDS = {  # every field a job request may carry (the OpenAPI body is built from it)
    "job_id", "model_name", "spec", "shards", "strategy", "train", "codec", "concurrency",
    "target_accuracy", "init_seed", "publish_every", "eligibility", "selection", "stop",
    "evaluation", "standardize",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Job:
    spec: JobSpec
    eligibility: EligibilityPolicy
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    stop: StopConfig = field(default_factory=StopConfig)


def _conv(value: Any, typ: type[Any], name: str) -> Any:
    try:
        return msgspec.convert(value, typ, strict=True)
    except (msgspec.ValidationError, SchemaError) as exc:
        raise JobError("validation", f"{name}: {exc}") from None


# the adaptive clipping bound jobs get unless they set clipping (bench/byzantine.py,
# docs/aggregator.md: clean accuracy unchanged, 20% Byzantine devices within 1.4 points)
DEFAULT_CLIP_MULTIPLIER = 2.0
CLIP_FIELDS = frozenset({"clip_norm", "clip_multiplier"})  # "the job chose its clipping"

MAX_PARAMS = 64 << 20  # default cap: 64 Mi float32 parameters = 256 MiB per model copy


def build_job(
    body: Any,
    *,
    now: float | None = None,
    max_shards: int = 1 << 16,
    max_params: int = MAX_PARAMS,
    default_shards: int = 1,
) -> Job:
    """Validate a job request and build its ``JobSpec``; any problem is a ``JobError``.

    A body without ``shards`` gets ``default_shards`` (the REST API passes one per live
    aggregator), at most one per parameter.

    Size caps: at most ``max_params`` parameters, and each shard's slice (an update chunk,
    a ``ShardVersion``) must fit one wire message (``UPDATE_MAX_BYTES``).
    """
    if not isinstance(body, dict):
        raise JobError("validation", "body must be a JSON object")
    unknown = set(body) - JOB_FIELDS
    if unknown:
        raise JobError("validation", f"unknown fields {sorted(unknown)}")
    for req in ("model_name", "spec"):
        if req not in body:
            raise JobError("validation", f"missing field {req!r}")
    spec = _conv(body["spec"], ModelSpecMsg, "spec")
    try:
        n = num_params(spec)
        shards = body.get("shards", max(1, min(default_shards, n, max_shards)))
        if not isinstance(shards, int) or isinstance(shards, bool):
            raise JobError("validation", "shards must be an integer")
        if shards > max_shards:
            raise JobError("validation", f"shards {shards} > max_shards {max_shards}")
        if n > max_params:
            raise JobError(
                "too_large", f"the model has {n:,} parameters; this coordinator accepts at most "
                f"{max_params:,} (max_params)",
            )  # fmt: skip
        if shards >= 1 and 4 * -(-n // shards) + (1 << 16) > UPDATE_MAX_BYTES:
            need = -(-4 * n // (UPDATE_MAX_BYTES - (1 << 16)))
            raise JobError(
                "too_large", f"a shard of {-(-n // shards):,} parameters does not fit one "
                f"update message ({UPDATE_MAX_BYTES:,} bytes): use at least {need} shards",
            )  # fmt: skip
        bounds = even_bounds(n, shards)
    except SchemaError as exc:
        raise JobError("validation", f"spec/shards: {exc}") from None
    job_id = body.get("job_id") or f"job-{secrets.token_hex(6)}"
    raw = {
        "job_id": job_id,
        "model_name": body["model_name"],
        "spec": spec,
        "shard_bounds": bounds,
        "strategy": _strategy(body.get("strategy", {})),
        "train": _conv(body.get("train", {}), TrainConfig, "train"),
        "codec": _conv(body.get("codec", {}), CodecConfig, "codec"),
        "evaluation": _conv(body.get("evaluation", {}), EvalConfig, "evaluation"),
        "created_ts": time.time() if now is None else now,
    }
    for k in ("concurrency", "target_accuracy", "init_seed", "publish_every", "standardize"):
        if k in body:
            raw[k] = body[k]
    job_spec = _conv(raw, JobSpec, "job")
    if job_spec.standardize and job_spec.spec.input_mean:
        raise JobError("validation", "standardize: the statistics phase fixes spec.input_mean"
                       "/input_std; a job that sets them cannot standardize")  # fmt: skip
    elig = EligibilityPolicy.from_dict(_obj(body.get("eligibility"), "eligibility"))
    sel = SelectionConfig.from_dict(_obj(body.get("selection"), "selection"))
    stop = StopConfig.from_dict(_obj(body.get("stop"), "stop"))
    strat = job_spec.strategy
    check_sync_round_size(sel.mode, strat.name, job_spec.concurrency, strat.buffer_size)
    return Job(job_spec, elig, sel, stop)


def _strategy(v: Any) -> StrategyConfig:
    """The job's ``StrategyConfig``, with the default adaptive bound unless it set one."""
    cfg: StrategyConfig = _conv(v, StrategyConfig, "strategy")
    if isinstance(v, dict) and not CLIP_FIELDS & v.keys():
        cfg = msgspec.structs.replace(cfg, clip_multiplier=DEFAULT_CLIP_MULTIPLIER)
    return cfg


def _obj(v: Any, name: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise JobError("validation", f"{name} must be an object")
    return v


def job_json(
    job: Job, stats: dict[str, int], current_version: int | None,
    federated: Evaluation | None = None, final: Evaluation | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The job as REST shows it; ``federated``: its newest complete evaluation;
    ``final``: a completed job's evaluation of its final (pinned) version."""
    out: dict[str, Any] = msgspec.to_builtins(job.spec)
    out.pop("kind", None)
    out["eligibility"] = job.eligibility.to_dict()
    out["selection"] = job.selection.to_dict()
    out["stop"] = job.stop.to_dict()
    out["alpha"] = job.spec.strategy.alpha
    out["staleness"] = job.spec.strategy.staleness
    shards: list[dict[str, Any]] = []
    for i in range(len(job.spec.shard_bounds) - 1):
        p = f"shard.{i}."
        shards.append({
            "shard": i,
            "version": stats.get(p + "version", 0),
            "updates_applied": stats.get(p + "applied", 0),
            "updates_rejected": stats.get(p + "rejected", 0),
            "mean_staleness": stats.get(p + "staleness_milli", 0) / 1000.0,
        })  # fmt: skip
    out["stats"] = {k: v for k, v in stats.items() if not k.startswith(("shard.", "aborts."))}
    # tasks devices aborted, by reason code (data_features, data_labels, deadline, ...)
    out["aborts"] = {k[len("aborts."):]: v for k, v in stats.items() if k.startswith("aborts.")}
    out["shards"] = shards
    out["updates_accepted"] = stats.get("updates_accepted", 0)
    # applied on every shard (the fewest any shard applied); per shard in ``shards``
    out["updates_applied"] = stats.get("updates_applied", 0)
    # refused by the coordinator before acknowledging (reasons in the stats' updates_*)
    out["updates_rejected"] = stats.get("updates_rejected", 0)
    # refused by a shard after acknowledgement: lost on that shard (should stay 0)
    out["updates_rejected_by_shards"] = sum(s["updates_rejected"] for s in shards)
    out["mean_staleness"] = stats.get("mean_staleness_milli", 0) / 1000.0
    out["current_version"] = current_version
    out["phase"] = job_phase(job.spec)  # statistics | training | ended
    out["federated"] = None if federated is None else federated.to_json()
    out["final_evaluation"] = None if final is None else final.to_json()
    return out


class JobStore:
    """``{p}{t}job:{id}`` hash (spec JSON, eligibility JSON, selection JSON, status, the
    journal ``revision`` it was written at), ``{p}jobs`` zset, ``{p}ending`` set (ended
    jobs not swept yet)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._r: Any = redis  # Redis, decode_responses=True (redis-py types bytes | str)
        self._k = Keys(prefix)

    async def put(self, job: Job, *, revision: int = 0) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self._k.job(job.spec.job_id),
            mapping={
                "spec": msgspec.json.encode(job.spec).decode(),
                "eligibility": msgspec.json.encode(job.eligibility.to_dict()).decode(),
                "selection": msgspec.json.encode(job.selection.to_dict()).decode(),
                "stop": msgspec.json.encode(job.stop.to_dict()).decode(),
                "status": job.spec.status,
                "revision": str(revision),
            },
        )
        pipe.zadd(self._k.jobs, {job.spec.job_id: job.spec.created_ts})
        if job.spec.status != "running":  # the selector sweeps what it leaves behind
            pipe.sadd(self._k.ending, job.spec.job_id)
        await pipe.execute()

    async def ending(self) -> list[str]:
        """Ended jobs the selector has not swept yet (side tasks, open evaluations, a
        completed job's final evaluation)."""
        return sorted(await self._r.smembers(self._k.ending))

    async def mark_ending(self, job_id: str) -> None:
        """Have the selector sweep ``job_id`` (an ended job given a final evaluation)."""
        await self._r.sadd(self._k.ending, job_id)

    async def swept(self, job_id: str) -> None:
        await self._r.srem(self._k.ending, job_id)

    async def exists(self, job_id: str) -> bool:
        return bool(await self._r.exists(self._k.job(job_id)))

    async def get(self, job_id: str) -> Job:
        h = await self._r.hgetall(self._k.job(job_id))
        if not h:
            raise NotFound("job", job_id)
        spec = msgspec.json.decode(h["spec"], type=JobSpec)
        if h.get("status") and h["status"] != spec.status:
            spec = msgspec.structs.replace(spec, status=h["status"])
        elig = EligibilityPolicy.from_dict(msgspec.json.decode(h["eligibility"]))
        sel = SelectionConfig.from_dict(msgspec.json.decode(h.get("selection") or "{}"))
        stop = StopConfig.from_dict(msgspec.json.decode(h.get("stop") or "{}"))
        return Job(spec, elig, sel, stop)

    async def revisions(self, job_ids: list[str]) -> dict[str, int]:
        """The journal revision each job was last written at (absent: Redis lacks it)."""
        pipe = self._r.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hmget(self._k.job(jid), ["spec", "revision"])
        out: dict[str, int] = {}
        for jid, (spec, rev) in zip(job_ids, await pipe.execute(), strict=True):
            if spec is not None:
                out[jid] = int(rev) if rev and rev.isdigit() else 0
        return out

    async def ids(self) -> list[str]:
        return list(await self._r.zrange(self._k.jobs, 0, -1))

    async def running(self) -> list[Job]:
        out = []
        for jid in await self.ids():
            try:
                job = await self.get(jid)
            except NotFound:
                continue
            if job.spec.status == "running":
                out.append(job)
        return out

    async def set_status(self, job_id: str, status: str) -> None:
        await self._r.hset(self._k.job(job_id), "status", status)
        if status != "running":
            await self._r.sadd(self._k.ending, job_id)
