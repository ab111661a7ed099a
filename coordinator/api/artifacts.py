"""Model artifacts: ``POST /v1/artifacts`` (admin) takes a user's ONNX file, checks and
normalises it (``schemas.artifact.normalize``: onnx checker, a probe run in onnxruntime,
float32 trainable initializers, size limits) and stores it durably; the answer carries the
``spec`` a job body names it with (``{"family": "onnx", "artifact": ..., "params": ...}``).
A bad file is 422 with the reason and nothing is stored. ``GET /v1/artifacts/{digest}``
serves the normalised bytes (immutable; devices check the sha256 against their job's spec).
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response

from coordinator.api.common import BINARY, R401, R404, R422, R503, ErrorBody, Responses, admin
from coordinator.api.state import AppState, app_state
from coordinator.api.uploads import UPDATE_BODY, read_bounded
from coordinator.errors import NotFound
from schemas.artifact import ArtifactError, normalize, spec_for
from schemas.messages import ARTIFACT_DIGEST

router = APIRouter(tags=["models"])
State = Annotated[AppState, Depends(app_state)]
Digest = Annotated[str, Path(pattern=ARTIFACT_DIGEST)]
R413: Responses = {413: {"model": ErrorBody,
                         "description": "the file is larger than max_artifact_bytes"}}
NAMES = re.compile(r"^[^,]{1,512}(,[^,]{1,512}){0,4095}$")


@router.post(
    "/v1/artifacts", status_code=201, dependencies=[Depends(admin)], openapi_extra=UPDATE_BODY,
    responses={**R401, **R413, **R422, **R503},
)  # fmt: skip
async def upload_artifact(
    request: Request, state: State,
    trainable: Annotated[str | None, Query(max_length=1 << 20,
                                           description="comma-separated initializer names "
                                           "to train (default: every float32 one)")] = None,
) -> dict[str, Any]:  # fmt: skip
    s = state.settings
    if state.artifacts is None:
        raise HTTPException(503, "this coordinator keeps no artifacts")
    if trainable is not None and not NAMES.match(trainable):
        raise HTTPException(422, "trainable: comma-separated initializer names")
    body = bytes(await read_bounded(request, s.max_artifact_bytes))
    names = None if trainable is None else trainable.split(",")
    try:
        info = await asyncio.to_thread(normalize, body, trainable=names,
                                       max_bytes=s.max_artifact_bytes,
                                       max_params=s.max_params)  # fmt: skip
    except ArtifactError as exc:
        state.metrics.rejected.labels(source="artifact", reason=exc.code).inc()
        raise HTTPException(422, f"artifact {exc.code}: {exc.detail}") from None
    del body
    try:
        await state.artifacts.put(info.data)
    except Exception as exc:
        raise HTTPException(503, f"could not store the artifact in Kafka: {exc}") from None
    return {
        "artifact": info.digest, "bytes": len(info.data), "num_params": info.num_params,
        "spec": msgspec.to_builtins(spec_for(info)),
    }  # fmt: skip


@router.get("/v1/artifacts/{digest}", response_class=Response,
            responses={200: BINARY, **R404, **R422})  # fmt: skip
async def get_artifact(state: State, digest: Digest) -> Response:
    if state.artifacts is None:
        raise NotFound("artifact", digest)
    data = await state.artifacts.get(digest)  # NotFound -> 404
    return Response(data, media_type="application/octet-stream", headers={
        "ETag": f'"{digest}"', "X-Fedfleet-Digest": digest.replace(":", "="),
        "Cache-Control": "public, max-age=31536000, immutable"})  # fmt: skip
