"""Jobs: create (admin), list, read, stop (admin)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Body, Depends, HTTPException, Path

from coordinator.api.common import R401, R404, R409, R422, R503, admin
from coordinator.api.state import AppState, app_state
from coordinator.errors import NotFound
from coordinator.jobs import Job, build_job, job_json

router = APIRouter(tags=["jobs"])
State = Annotated[AppState, Depends(app_state)]
JobId = Annotated[str, Path(max_length=128)]


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
    return job_json(job, stats, cur)


@router.post(
    "/v1/jobs", status_code=201, dependencies=[Depends(admin)],
    responses={**R401, **R409, **R422, **R503},
)  # fmt: skip
async def create_job(state: State, body: Annotated[Any, Body()]) -> dict[str, Any]:
    s = state.settings
    job = build_job(body, max_shards=s.max_shards, max_params=s.max_params)
    if await state.jobs.exists(job.spec.job_id):
        raise HTTPException(409, f"job {job.spec.job_id} exists")
    await asyncio.to_thread(state.registry.create_initial, job.spec)
    await state.jobs.put(job)
    try:
        await state.publish_job(job.spec)
    except Exception as exc:
        await state.jobs.set_status(job.spec.job_id, "stopped")
        raise HTTPException(503, f"could not publish job to Kafka: {exc}") from None
    return await job_out(state, job)


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
    job = await state.jobs.get(job_id)
    spec = msgspec.structs.replace(job.spec, status="stopped")
    await state.jobs.set_status(job_id, "stopped")
    try:
        await state.publish_job(spec)
    except Exception as exc:
        raise HTTPException(503, f"stopped here, but could not publish to Kafka: {exc}") from None
    return await job_out(state, Job(spec, job.eligibility, job.selection))
