"""Jobs: create (admin), list, read, stop (admin)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path
from redis.exceptions import RedisError

from coordinator.api.bodies import JOB_EXAMPLE, JOB_REQUEST, json_body
from coordinator.api.common import R400, R401, R404, R409, R422, R503, admin
from coordinator.api.state import AppState, app_state
from coordinator.errors import CoordinatorError, NotFound
from coordinator.evaluation import final_of, latest_complete
from coordinator.jobs import Job, build_job, job_json
from coordinator.kafka import group_members
from coordinator.lifecycle import set_status
from coordinator.settings import CoordinatorSettings
from schemas.artifact import ArtifactError, initial_flat
from schemas.messages import ModelSpecMsg

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])
State = Annotated[AppState, Depends(app_state)]
JobId = Annotated[str, Path(max_length=128)]


async def check_artifact(state: AppState, spec: ModelSpecMsg) -> None:
    """An onnx job names a stored artifact, and its ``params`` are that artifact's
    (names, shapes, float32); 422 otherwise."""
    try:
        if state.artifacts is None:
            raise NotFound("artifact", spec.artifact)
        data = await state.artifacts.get(spec.artifact)
    except NotFound:
        raise HTTPException(422, f"spec.artifact {spec.artifact} is unknown: upload the ONNX "
                                 "file with POST /v1/artifacts first") from None  # fmt: skip
    try:
        await asyncio.to_thread(initial_flat, data, spec.params)
    except ArtifactError as exc:
        raise HTTPException(422, f"spec.params do not match the artifact: {exc.detail}") from None


async def job_out(state: AppState, job: Job) -> dict[str, Any]:
    stats = await state.stats.stats(job.spec.job_id)
    stats["active_leases"] = await state.tasks.active_count(job.spec.job_id)
    cur = None
    try:
        m = await asyncio.to_thread(state.registry.latest, job.spec.model_name)
        cur = m.version if m.job_id == job.spec.job_id else None
        if cur is not None:
            stats.setdefault("updates_applied", 0)
    except NotFound:
        pass
    evs = [] if state.evals is None else await state.evals.evaluations(job.spec.job_id)
    return job_json(job, stats, cur, latest_complete(evs), final_of(evs))


@router.post(
    "/v1/jobs", status_code=201, dependencies=[Depends(admin)],
    responses={**R400, **R401, **R409, **R422, **R503},
    openapi_extra=json_body(JOB_REQUEST, JOB_EXAMPLE),
)  # fmt: skip
async def create_job(state: State, body: Annotated[Any, Body()]) -> dict[str, Any]:
    s = state.settings
    default = 1
    if isinstance(body, dict) and "shards" not in body:
        default = await live_aggregators(s)
    job = build_job(body, max_shards=s.max_shards, max_params=s.max_params, default_shards=default)
    if job.spec.spec.family == "onnx":
        await check_artifact(state, job.spec.spec)
    jid, name = job.spec.job_id, job.spec.model_name
    known = state.journal.latest()  # also jobs a lost Redis no longer holds
    if jid in known or await state.jobs.exists(jid):
        raise HTTPException(409, f"job {jid} exists")  # never re-initialise its model
    holder = await running_job_of(state, name, known)
    if holder is not None:
        raise HTTPException(409, f"model {name!r} is being trained by running job {holder}: "
                                 "stop it first or use another model_name")  # fmt: skip
    try:
        rev = await state.journal.append(job)  # the durable record first
    except Exception as exc:
        raise HTTPException(503, f"could not record the job in Kafka: {exc}") from None
    await asyncio.to_thread(state.registry.create_initial, job.spec)
    await state.jobs.put(job, revision=rev)
    try:
        await state.publish_job(job.spec)
    except Exception as exc:
        await state.jobs.set_status(jid, "stopped")
        raise HTTPException(503, f"could not publish job to Kafka: {exc}") from None
    return await job_out(state, job)


async def live_aggregators(s: CoordinatorSettings) -> int:
    """Live members of the aggregators' consumer group (1 when there are none yet, or
    Kafka cannot say): the shards a job gets when its body names none."""
    try:
        return max(1, await group_members(s, s.aggregator_group))
    except CoordinatorError as exc:
        log.warning("a job without shards gets 1: %s", exc)
        return 1


async def running_job_of(
    state: AppState, model_name: str, known: dict[str, tuple[int, Job]]
) -> str | None:
    """The running job that trains ``model_name`` (in Redis or only in the journal)."""
    for rjob in await state.jobs.running():
        if rjob.spec.model_name == model_name:
            return rjob.spec.job_id
    for jid, (_, kjob) in known.items():
        if kjob.spec.model_name == model_name and kjob.spec.status == "running":
            return jid
    return None


@router.get("/v1/jobs")
async def list_jobs(state: State) -> dict[str, Any]:
    out = []
    for jid in await state.jobs.ids():
        try:
            out.append(await job_out(state, await state.jobs.get(jid)))
        except NotFound:
            continue
    return {"jobs": out}


@router.get("/v1/jobs/{job_id}", responses={**R404, **R422})
async def get_job(state: State, job_id: JobId) -> dict[str, Any]:
    return await job_out(state, await state.jobs.get(job_id))


@router.post(
    "/v1/jobs/{job_id}/stop", dependencies=[Depends(admin)],
    responses={**R401, **R404, **R422, **R503},
)  # fmt: skip
async def stop_job(state: State, job_id: JobId) -> dict[str, Any]:
    await state.jobs.get(job_id)  # 404 first
    try:
        stopped = await set_status(job_id, "stopped", "stopped by request",
                                   journal=state.journal, jobs=state.jobs,
                                   publish_job=state.publish_job)  # fmt: skip
    except RedisError:
        raise
    except Exception as exc:
        raise HTTPException(503, f"could not record the stop in Kafka: {exc}") from None
    return await job_out(state, stopped)
