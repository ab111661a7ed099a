"""Federated evaluation of a job: ``GET /v1/jobs/{id}/metrics``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from coordinator.api.common import R404, R422
from coordinator.api.state import AppState, app_state
from coordinator.evaluation import latest_complete

router = APIRouter(tags=["jobs"])
State = Annotated[AppState, Depends(app_state)]
JobId = Annotated[str, Path(max_length=128)]


@router.get("/v1/jobs/{job_id}/metrics", responses={**R404, **R422})
async def job_metrics(state: State, job_id: JobId) -> dict[str, Any]:
    """Every evaluation of the job, oldest first (``version``, ``reports``, ``examples``,
    example-weighted ``loss`` and ``accuracy``, per-class counts, ``complete``, times),
    and ``latest``: the newest complete one (null while there is none)."""
    await state.jobs.get(job_id)  # 404 first
    evs = [] if state.evals is None else await state.evals.evaluations(job_id)
    latest = latest_complete(evs)
    return {"job_id": job_id, "evaluations": [e.to_json() for e in evs],
            "latest": None if latest is None else latest.to_json()}  # fmt: skip
