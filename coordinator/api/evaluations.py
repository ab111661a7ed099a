"""Federated evaluation of a job: ``GET /v1/jobs/{id}/metrics``; ``POST
/v1/jobs/{id}/evaluate`` (admin) has the fleet score a version of an ended job."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from coordinator.api.common import R400, R401, R404, R409, R422, R503, admin
from coordinator.api.state import AppState, app_state
from coordinator.errors import NotFound
from coordinator.evaluation import final_need, final_of, latest_complete

router = APIRouter(tags=["jobs"])
State = Annotated[AppState, Depends(app_state)]
JobId = Annotated[str, Path(max_length=128)]


@router.get("/v1/jobs/{job_id}/metrics", responses={**R404, **R422})
async def job_metrics(state: State, job_id: JobId) -> dict[str, Any]:
    """Every evaluation of the job, oldest first (``version``, ``reports``, ``examples``,
    example-weighted ``loss`` and ``accuracy``, per-class counts, ``complete``, times),
    ``latest``: the newest complete one (null while there is none), and ``final``: the
    evaluation of an ended job's final version (null: none, or not yet)."""
    await state.jobs.get(job_id)  # 404 first
    evs = [] if state.evals is None else await state.evals.evaluations(job_id)
    latest, final = latest_complete(evs), final_of(evs)
    return {"job_id": job_id, "evaluations": [e.to_json() for e in evs],
            "latest": None if latest is None else latest.to_json(),
            "final": None if final is None else final.to_json()}  # fmt: skip


class EvaluateBody(BaseModel):
    """``version``: default the job's newest version; ``devices``: how many devices score
    it (default the job's ``evaluation.final_devices``, else ``evaluation.devices``)."""

    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=0, le=1 << 62)
    devices: int | None = Field(default=None, ge=1, le=1 << 20)


@router.post(
    "/v1/jobs/{job_id}/evaluate", status_code=202, dependencies=[Depends(admin)],
    responses={**R400, **R401, **R404, **R409, **R422, **R503},
)  # fmt: skip
async def evaluate_job(
    state: State, job_id: JobId, body: Annotated[EvaluateBody | None, Body()] = None
) -> dict[str, Any]:
    """Give an ended (stopped, completed, failed) job its final evaluation: idle eligible
    devices score ``version`` on their held-out rows, each once; it closes once
    ``devices`` reported, at the job's ``evaluation.timeout_s``, or once nobody is left
    to ask. Follow it in ``GET /v1/jobs/{id}/metrics`` (``final``). A completed job gets
    one of its pinned version by itself; a job has at most one."""
    body = body or EvaluateBody()
    job = await state.jobs.get(job_id)
    spec = job.spec
    if spec.status == "running":
        raise HTTPException(409, "a running job is evaluated on its cadence "
                                 "(evaluation.every_versions); stop it first")  # fmt: skip
    if state.evals is None:
        raise HTTPException(503, "this coordinator keeps no evaluations")
    name = spec.model_name

    def version_of_job() -> int | None:
        v = body.version if body.version is not None else state.registry.newest_version(name)
        if v is None:
            return None
        return v if state.registry.manifest(name, v).job_id == job_id else None

    try:
        version = await asyncio.to_thread(version_of_job)
    except NotFound:
        version = None
    if version is None:
        raise HTTPException(422, f"model {name!r} has no such version of job {job_id}")
    cfg = spec.evaluation
    need = body.devices or final_need(cfg.devices or 1, cfg.final_devices, cfg.min_reports)
    if not await state.evals.open_final(job_id, version, need, time.time()):
        raise HTTPException(409, f"job {job_id} has its final evaluation already")
    await state.jobs.mark_ending(job_id)
    final = final_of(await state.evals.evaluations(job_id))
    return {"job_id": job_id, "final": None if final is None else final.to_json()}
