"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from coordinator.api.state import AppState, app_state

router = APIRouter(tags=["health"])


class Ready(BaseModel):
    ready: bool


@router.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "Redis or the MQTT session is down"}},
)
async def readyz(state: Annotated[AppState, Depends(app_state)]) -> JSONResponse:
    ok = True
    try:
        await state.fleet.ping()
    except Exception:
        ok = False
    if ok and state.ready is not None:
        ok = await state.ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                     "description": "Prometheus text format"}},
)  # fmt: skip
async def metrics(state: Annotated[AppState, Depends(app_state)]) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
