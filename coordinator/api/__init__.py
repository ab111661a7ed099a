"""REST API (FastAPI): one router per resource — health, fleet, jobs (and their
evaluations), models.

The app is built by ``create_app(state)`` around already-open adapters (``AppState``);
``coordinator.service.Coordinator`` opens them in its lifespan (an ``AsyncExitStack``).
Write endpoints need ``Authorization: Bearer <admin_token>`` (401 otherwise); unknown ids
are 404; invalid bodies or parameters are 422; a store that is down is 503. Every error is
JSON ``{"detail": "<one line>"}`` and every answer a route can give is declared in the
OpenAPI document (``/openapi.json``), which schemathesis checks in CI.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.api import (
    artifacts,
    enrol,
    evaluations,
    fleet,
    health,
    jobs,
    models,
    uploads,
)
from coordinator.api.state import AppState, app_state
from coordinator.errors import JobError, NotFound

log = logging.getLogger(__name__)

__all__ = ["AppState", "app_state", "create_app"]


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="fedfleet coordinator", version="1")
    app.state.coord = state

    @app.exception_handler(NotFound)
    async def _nf(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": f"unknown {exc.code}: {exc.detail}"}, status_code=404)

    @app.exception_handler(JobError)
    async def _je(_: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail or exc.code}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _rv(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        state.metrics.errors.labels(loop="rest").inc()
        log.warning("REST: Redis unavailable: %s", exc)
        return JSONResponse({"detail": f"store unavailable: {type(exc).__name__}"},
                            status_code=503, headers={"Retry-After": "2"})  # fmt: skip

    routers = (health.router, fleet.router, jobs.router, evaluations.router, models.router,
               artifacts.router, uploads.router, enrol.router)  # fmt: skip
    for r in routers:
        app.include_router(r)
    return app
