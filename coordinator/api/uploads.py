"""Uploads over HTTP: ``POST /v1/uploads``, next to the MQTT ``fleet/{id}/update`` path.

For updates too large for a broker to carry comfortably, and for devices whose MQTT session
is down. The body is one MessagePack ``Update`` (``Content-Type: application/msgpack``),
read as a stream into one buffer and refused (413) as soon as it passes the size bound; it
then goes through the same ``UploadHandler`` as an MQTT upload: the task's one-use token,
dedupe by ``update_id``, and an answer only after every shard record is acknowledged by
Kafka. The answer is the ``UploadAck`` itself (MessagePack), status 200 for accepted,
duplicate and rejected alike: the device drops the update from its outbox on any of them,
as it does for an MQTT ack. A body that is not an ``Update`` is 422 with the schema reason
(counted in ``fedfleet_coord_rejected_total{source="http_update"}``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from coordinator.api.common import R401, R422, R503, ErrorBody, Responses
from coordinator.api.state import AppState, app_state
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, Update, decode, encode

router = APIRouter(tags=["uploads"])
State = Annotated[AppState, Depends(app_state)]
MSGPACK = "application/msgpack"
R413: Responses = {413: {"model": ErrorBody, "description": "the body is larger than an "
                         "update may be"}}  # fmt: skip
ACK_BODY: Responses = {200: {"description": "the UploadAck (MessagePack): accepted, duplicate "
                             "or rejected with its reason", "content": {MSGPACK: {}}}}  # fmt: skip
# declared as octet-stream (what OpenAPI tools can generate); any content type is read the
# same way, the agent sends application/msgpack
UPDATE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}  # fmt: skip


R403: Responses = {403: {"model": ErrorBody, "description": "the update names another device "
                         "than the credential"}}  # fmt: skip
BASIC_DOC = ("the device's own credential (device id and the password from enrolment); "
             "required when require_enrolment is set")
basic = HTTPBasic(auto_error=False, description=BASIC_DOC)


async def authenticated_device(
    state: AppState, creds: HTTPBasicCredentials | None
) -> str | None:
    """The device the request's Basic credential proves (None: none was needed). With
    ``require_enrolment`` a missing, wrong or revoked credential is 401."""
    if not state.settings.require_enrolment:
        return None
    why = "missing"
    if creds is not None and state.enroller is not None:
        if await state.enroller.store.verify(creds.username, creds.password):
            return creds.username
        why = "wrong"
    state.metrics.auth_refused.labels(what="device", reason=why).inc()
    raise HTTPException(401, f"{why} device credential",
                        headers={"WWW-Authenticate": 'Basic realm="fedfleet devices"'})  # fmt: skip


async def read_bounded(request: Request, limit: int) -> bytearray:
    """The request body, streamed into one buffer; 413 once it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes > limit {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise HTTPException(413, f"body over the limit of {limit} bytes")
    return buf


@router.post(
    "/v1/uploads", response_class=Response, openapi_extra=UPDATE_BODY,
    responses={**ACK_BODY, **R401, **R403, **R413, **R422, **R503},
)  # fmt: skip
async def upload(
    request: Request, state: State,
    creds: Annotated[HTTPBasicCredentials | None, Depends(basic)],
) -> Response:  # fmt: skip
    if state.upload is None:
        raise HTTPException(503, "this coordinator does not take uploads")
    device = await authenticated_device(state, creds)
    body = await read_bounded(request, UPDATE_MAX_BYTES)
    try:
        upd = decode(body, Update, max_bytes=UPDATE_MAX_BYTES)
    except SchemaError as exc:
        state.metrics.rejected.labels(source="http_update", reason=exc.reason).inc()
        raise HTTPException(422, f"not an update: {exc}") from None
    del body
    if device is not None and device != upd.device_id:
        state.metrics.auth_refused.labels(what="device", reason="device_mismatch").inc()
        state.metrics.rejected.labels(source="http_update", reason="device_mismatch").inc()
        raise HTTPException(403, "the update names another device than the credential")
    ack = await state.upload(upd)
    return Response(encode(ack), media_type=MSGPACK)
