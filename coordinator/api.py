"""REST API (FastAPI): fleet, devices, jobs, models, keys, metrics, health.

The app is built by ``create_app(state)`` around already-open adapters (``AppState``);
``coordinator.service.Coordinator`` opens them in its lifespan (an ``AsyncExitStack``).
Write endpoints need ``Authorization: Bearer <admin_token>``; unknown ids are 404;
invalid bodies are 422 with a ``detail`` message.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.errors import JobError, NotFound
from coordinator.fleet import FleetStore, device_json, device_state, fleet_summary
from coordinator.jobs import Job, JobStore, build_job, job_json
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import EligibilityPolicy
from coordinator.registry import ModelRegistry
from coordinator.settings import CoordinatorSettings
from coordinator.signing import Signer
from coordinator.tasks import TaskStore
from schemas.messages import JobSpec, ModelManifest


@dataclass
class AppState:
    settings: CoordinatorSettings
    fleet: FleetStore
    jobs: JobStore
    tasks: TaskStore
    registry: ModelRegistry
    signer: Signer
    metrics: CoordinatorMetrics
    publish_job: Callable[[JobSpec], Awaitable[None]]
    ready: Callable[[], Awaitable[bool]] | None = None
    _onnx_cache: dict[tuple[str, int, str], tuple[bytes, str, str]] = field(default_factory=dict)


def _manifest_json(m: ModelManifest) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(m)
    return out


def _not_modified(inm: str | None, etag: str) -> bool:
    if not inm:
        return False
    tags = [t.strip() for t in inm.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="fedfleet coordinator", version="1")
    app.state.coord = state
    s = state.settings

    def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {s.admin_token}"
        if not authorization or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(NotFound)
    async def _nf(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": f"unknown {exc.code}: {exc.detail}"}, status_code=404)

    @app.exception_handler(JobError)
    async def _je(_: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail or exc.code}, status_code=422)

    # ------------------------------------------------------------- health, metrics
    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = True
        try:
            await state.fleet.r.ping()
        except Exception:
            ok = False
        if ok and state.ready is not None:
            ok = await state.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------- fleet, devices
    @app.get("/v1/fleet")
    async def fleet() -> dict[str, Any]:
        now = time.time()
        views = await state.fleet.all_views(now)
        running = await state.jobs.running()
        policy = running[0].eligibility if running else EligibilityPolicy()
        out = fleet_summary(views, len(views), policy, now)
        accepted = 0
        for j in await state.jobs.ids():
            accepted += (await state.tasks.stats(j)).get("updates_accepted", 0)
        out["updates_accepted"] = accepted
        return out

    @app.get("/v1/devices")
    async def devices(
        state_: Annotated[
            str | None, Query(alias="state", pattern="^(offline|idle|training)$")
        ] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        ids = await state.fleet.all_ids()
        if state_ is None:
            page_ids = ids[offset : offset + limit]
            views = await state.fleet.views(page_ids)
            total = len(ids)
        else:
            allv = [v for v in await state.fleet.all_views() if device_state(v) == state_]
            allv.sort(key=lambda v: v.device_id)
            total = len(allv)
            views = allv[offset : offset + limit]
        return {
            "total": total,
            "offset": offset,
            "limit": limit,
            "devices": [device_json(v) for v in views],
        }

    @app.get("/v1/devices/{device_id}")
    async def device(device_id: str) -> dict[str, Any]:
        d = await state.fleet.get(device_id)
        if d is None:
            raise NotFound("device", device_id)
        return d

    # ------------------------------------------------------------- jobs
    async def _job_out(job: Job) -> dict[str, Any]:
        stats = await state.tasks.stats(job.spec.job_id)
        stats["active_leases"] = await state.tasks.active_count(job.spec.job_id)
        cur = None
        try:
            m = state.registry.latest(job.spec.model_name)
            cur = m.version if m.job_id == job.spec.job_id else None
            if cur is not None:
                stats.setdefault("updates_applied", 0)
        except NotFound:
            pass
        return job_json(job, stats, cur)

    @app.post("/v1/jobs", status_code=201, dependencies=[Depends(admin)])
    async def create_job(body: Annotated[Any, Body()]) -> dict[str, Any]:
        job = build_job(body, max_shards=s.max_shards)
        if await state.jobs.exists(job.spec.job_id):
            raise HTTPException(409, f"job {job.spec.job_id} exists")
        await asyncio.to_thread(state.registry.create_initial, job.spec)
        await state.jobs.put(job)
        try:
            await state.publish_job(job.spec)
        except Exception as exc:
            await state.jobs.set_status(job.spec.job_id, "stopped")
            raise HTTPException(503, f"could not publish job to Kafka: {exc}") from None
        return await _job_out(job)

    @app.get("/v1/jobs")
    async def list_jobs() -> dict[str, Any]:
        out = []
        for jid in await state.jobs.ids():
            try:
                out.append(await _job_out(await state.jobs.get(jid)))
            except NotFound:
                continue
        return {"jobs": out}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return await _job_out(await state.jobs.get(job_id))

    @app.post("/v1/jobs/{job_id}/stop", dependencies=[Depends(admin)])
    async def stop_job(job_id: str) -> dict[str, Any]:
        job = await state.jobs.get(job_id)
        spec = msgspec.structs.replace(job.spec, status="stopped")
        await state.jobs.set_status(job_id, "stopped")
        await state.publish_job(spec)
        return await _job_out(Job(spec, job.eligibility, job.selection))

    # ------------------------------------------------------------- models
    def _headers(etag: str, digest: str, sig: str) -> dict[str, str]:
        return {
            "ETag": etag,
            "X-Fedfleet-Digest": f"sha256={digest}",
            "X-Fedfleet-Signature": sig,
            "Cache-Control": "no-cache",
        }

    def _manifest_response(m: ModelManifest, inm: str | None) -> Response:
        etag = f'"m{m.version}-{m.digest[:32]}"'
        headers = _headers(etag, m.digest, m.signature)
        if _not_modified(inm, etag):
            return Response(status_code=304, headers=headers)
        return Response(
            msgspec.json.encode(_manifest_json(m)), media_type="application/json", headers=headers
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": state.registry.models()}

    @app.get("/v1/models/{name}/latest")
    async def latest(name: str, if_none_match: Annotated[str | None, Header()] = None) -> Response:
        return _manifest_response(state.registry.latest(name), if_none_match)

    @app.get("/v1/models/{name}/versions")
    async def versions(name: str) -> dict[str, Any]:
        vs = state.registry.versions(name)
        if not vs:
            raise NotFound("model", name)
        latest_v = state.registry.latest(name).version
        return {
            "model_name": name,
            "versions": vs,
            "latest": latest_v,
            "pinned": state.registry.pinned(name),
        }

    @app.get("/v1/models/{name}/versions/{version}")
    async def version(
        name: str, version: int, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        return _manifest_response(state.registry.manifest(name, version), if_none_match)

    @app.get("/v1/models/{name}/versions/{version}/weights")
    async def weights(
        name: str, version: int, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        m = state.registry.manifest(name, version)
        etag = f'"{m.digest}"'
        headers = _headers(etag, m.digest, m.signature)
        if _not_modified(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        data = await asyncio.to_thread(state.registry.weights, m)
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.get("/v1/models/{name}/latest.onnx")
    async def latest_onnx(
        name: str, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        m = state.registry.latest(name)
        key = (name, m.version, m.digest)
        hit = state._onnx_cache.get(key)
        if hit is None:
            hit = await asyncio.to_thread(state.registry.onnx, m)
            if len(state._onnx_cache) > 64:
                state._onnx_cache.clear()
            state._onnx_cache[key] = hit
        data, digest, sig = hit
        etag = f'"{digest}"'
        headers = _headers(etag, digest, sig)
        headers["X-Fedfleet-Version"] = str(m.version)
        if _not_modified(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.post("/v1/models/{name}/rollback", dependencies=[Depends(admin)])
    async def rollback(name: str, body: Annotated[Any, Body()]) -> dict[str, Any]:
        v = body.get("version") if isinstance(body, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise JobError("validation", 'body must be {"version": <int >= 0>}')
        m = state.registry.rollback(name, v)
        return {"model_name": name, "pinned": m.version, "digest": m.digest}

    @app.delete("/v1/models/{name}/pin", dependencies=[Depends(admin)])
    async def unpin(name: str) -> dict[str, Any]:
        if not state.registry.versions(name):
            raise NotFound("model", name)
        state.registry.unpin(name)
        return {"model_name": name, "pinned": None, "latest": state.registry.latest(name).version}

    @app.get("/v1/keys/model-signing")
    async def signing_key() -> dict[str, str]:
        return {"alg": "ed25519", "public_key": state.signer.public_hex}

    return app
