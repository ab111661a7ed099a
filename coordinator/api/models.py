"""Models: manifests, weights and ONNX (signed, with ETags), rollback/unpin (admin), and
the signing key. Registry reads touch the filesystem, so they run in worker threads.

The ``latest`` answers (manifest and ``latest.onnx``) also carry the model's publication
(``X-Fedfleet-Publication``) and its signature (``X-Fedfleet-Publication-Signature``, over
``schemas.signing.latest_message`` / ``latest_onnx_message``): devices refuse a ``latest``
older than one they accepted. Version routes are unchanged."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Body, Depends, Header, Path, Response

from coordinator.api.bodies import ROLLBACK_EXAMPLE, ROLLBACK_REQUEST, RollbackBody, json_body
from coordinator.api.common import (
    BINARY,
    R304,
    R400,
    R401,
    R404,
    R422,
    Responses,
    admin,
    not_modified,
    signed_headers,
)
from coordinator.api.state import AppState, app_state
from coordinator.errors import JobError, NotFound
from coordinator.registry import Latest
from schemas.messages import ModelManifest
from schemas.signing import PUBLICATION_HEADER, PUBLICATION_SIGNATURE_HEADER

router = APIRouter(tags=["models"])
State = Annotated[AppState, Depends(app_state)]
Name = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
Version = Annotated[int, Path(ge=0, le=(1 << 31) - 1)]
IfNoneMatch = Annotated[str | None, Header()]
READ: Responses = {**R304, **R404, **R422}
JSON_MANIFEST: dict[str, Any] = {"content": {"application/json": {"schema": {"type": "object"}}},
                 "description": "the ModelManifest"}  # fmt: skip


def _publication(headers: dict[str, str], publication: int, sig: str) -> dict[str, str]:
    headers[PUBLICATION_HEADER] = str(publication)
    headers[PUBLICATION_SIGNATURE_HEADER] = sig
    return headers


def _manifest_response(m: ModelManifest, inm: str | None, lt: Latest | None = None) -> Response:
    etag = f'"m{m.version}-{m.digest[:32]}"'
    headers = signed_headers(etag, m.digest, m.signature)
    if lt is not None:
        _publication(headers, lt.publication, lt.signature)
    if not_modified(inm, etag):
        return Response(status_code=304, headers=headers)
    body = msgspec.json.encode(msgspec.to_builtins(m))
    return Response(body, media_type="application/json", headers=headers)


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    return {"models": await asyncio.to_thread(state.registry.models)}


@router.get("/v1/models/{name}/latest", response_class=Response,
            responses={200: JSON_MANIFEST, **READ})  # fmt: skip
async def latest(state: State, name: Name, if_none_match: IfNoneMatch = None) -> Response:
    lt = await asyncio.to_thread(state.registry.latest_signed, name)
    return _manifest_response(lt.manifest, if_none_match, lt)


@router.get("/v1/models/{name}/versions", responses={**R404, **R422})
async def versions(state: State, name: Name) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        vs = state.registry.versions(name)
        if not vs:
            raise NotFound("model", name)
        ptr = state.registry.publication(name)
        return {"model_name": name, "versions": vs, "latest": ptr.version,
                "pinned": state.registry.pinned(name), "publication": ptr.publication}  # fmt: skip

    return await asyncio.to_thread(read)


@router.get("/v1/models/{name}/versions/{version}", response_class=Response,
            responses={200: JSON_MANIFEST, **READ})  # fmt: skip
async def version(
    state: State, name: Name, version: Version, if_none_match: IfNoneMatch = None
) -> Response:
    m = await asyncio.to_thread(state.registry.manifest, name, version)
    return _manifest_response(m, if_none_match)


@router.get("/v1/models/{name}/versions/{version}/weights", response_class=Response,
            responses={200: {**BINARY, "description": "float32 LE"}, **READ})  # fmt: skip
async def weights(
    state: State, name: Name, version: Version, if_none_match: IfNoneMatch = None
) -> Response:
    m = await asyncio.to_thread(state.registry.manifest, name, version)
    etag = f'"{m.digest}"'
    headers = signed_headers(etag, m.digest, m.signature)
    if not_modified(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    data = await asyncio.to_thread(state.registry.weights, m)
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get("/v1/models/{name}/latest.onnx", response_class=Response,
            responses={200: {**BINARY, "description": "ONNX model"}, **READ})  # fmt: skip
async def latest_onnx(state: State, name: Name, if_none_match: IfNoneMatch = None) -> Response:
    lt = await asyncio.to_thread(state.registry.latest_signed, name)
    m = lt.manifest
    key = (name, m.version, m.digest)
    hit = state.onnx_cache.get(key)
    if hit is None:
        hit = await asyncio.to_thread(state.registry.onnx, m)
        if len(state.onnx_cache) > 64:
            state.onnx_cache.clear()
        state.onnx_cache[key] = hit
    data, digest, sig = hit
    headers = signed_headers(f'"{digest}"', digest, sig)
    headers["X-Fedfleet-Version"] = str(m.version)
    psig = state.registry.sign_latest(name, lt.publication, m.version, digest, onnx=True)
    _publication(headers, lt.publication, psig)
    if not_modified(if_none_match, f'"{digest}"'):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.post("/v1/models/{name}/rollback", dependencies=[Depends(admin)],
             responses={**R400, **R401, **R404, **R422},
             openapi_extra=json_body(ROLLBACK_REQUEST, ROLLBACK_EXAMPLE))  # fmt: skip
async def rollback(state: State, name: Name, body: Annotated[Any, Body()]) -> dict[str, Any]:
    try:
        v = msgspec.convert(body, RollbackBody, strict=True).version
    except msgspec.ValidationError:
        raise JobError("validation", 'body must be {"version": <int >= 0>}') from None

    def do() -> dict[str, Any]:
        m = state.registry.rollback(name, v)
        pub = state.registry.publication(name).publication
        return {"model_name": name, "pinned": m.version, "digest": m.digest, "publication": pub}

    return await asyncio.to_thread(do)


@router.delete("/v1/models/{name}/pin", dependencies=[Depends(admin)],
               responses={**R401, **R404, **R422})  # fmt: skip
async def unpin(state: State, name: Name) -> dict[str, Any]:
    def do() -> dict[str, Any]:
        if not state.registry.versions(name):
            raise NotFound("model", name)
        state.registry.unpin(name)
        ptr = state.registry.publication(name)
        return {"model_name": name, "pinned": None, "latest": ptr.version,
                "publication": ptr.publication}  # fmt: skip

    return await asyncio.to_thread(do)


@router.get("/v1/keys/model-signing", tags=["keys"])
async def signing_key(state: State) -> dict[str, str]:
    return {"alg": "ed25519", "public_key": state.signer.public_hex}
