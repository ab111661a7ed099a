"""Enrolment and revocation (``coordinator.enrolment``; docs/security.md).

* ``POST /v1/enrolment-tokens`` (admin): one-use tokens, valid ``ttl_s``, optionally bound to
  one device id; answered once, stored only as their sha256.
* ``POST /v1/enrol`` (no admin token: the enrolment token is the credential): the device's
  own broker password (answered once), the broker to use (``mqtt.host``/``port``: its
  home broker; ``mqtt.brokers``: every broker in its failover order, home first), the
  fleet CA that broker's TLS certificate chains to, and the model-signing key to pin. 403
  with the reason for a token that is unknown, used, expired or bound to another id; 409
  for an id already enrolled; 503 when the broker's credential store does not answer (the
  token stays usable).
* ``POST /v1/devices/{id}/revoke`` (admin): the broker drops the device's credential and
  cuts its sessions; it leaves the fleet view.

A coordinator without a broker credential store (an anonymous broker) answers all three
404: there is no enrolment to ask for there (503 is kept for a store that is down).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Body, Depends, HTTPException, Path

from coordinator.api.bodies import json_body, schemas_of
from coordinator.api.common import R400, R401, R404, R422, R503, ErrorBody, Responses, admin
from coordinator.api.state import AppState, app_state
from coordinator.enrolment import Enroller
from coordinator.errors import EnrolmentRefused, EnrolmentUnavailable, JobError
from schemas.brokers import broker_for
from schemas.messages import Id

router = APIRouter(tags=["enrolment"])
State = Annotated[AppState, Depends(app_state)]
R403: Responses = {403: {"model": ErrorBody, "description": "the enrolment token is unknown, "
                         "used, expired or bound to another device id"}}  # fmt: skip
R409: Responses = {409: {"model": ErrorBody, "description": "the device id is enrolled"}}
Label = Annotated[str, msgspec.Meta(max_length=200)]


class TokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ask for enrolment tokens."""

    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] | None = None  # default: enrol_token_ttl_s
    device_id: Id | None = None  # bind every token to this id
    label: Label = ""


class EnrolRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device trades an enrolment token for its credential."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    device_id: Id


TOKEN_SCHEMA, ENROL_SCHEMA = schemas_of(TokenRequest, EnrolRequest)


def _enroller(state: AppState) -> Enroller:
    if state.enroller is None or state.enroller.broker is None:
        raise HTTPException(404, NO_ENROLMENT)
    return state.enroller


NO_ENROLMENT = ("no enrolment on this coordinator: it has no broker credential store (it "
                "needs the secure broker, docs/security.md)")


def _unavailable(exc: EnrolmentUnavailable) -> HTTPException:
    return HTTPException(503, f"{exc.code}: {exc.detail}", headers={"Retry-After": "5"})


def _body(body: Any, tp: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.convert(body, tp, strict=True)
    except msgspec.ValidationError as exc:
        raise JobError("validation", str(exc)) from None


@router.post("/v1/enrolment-tokens", status_code=201, dependencies=[Depends(admin)],
             responses={**R400, **R401, **R404, **R422, **R503},
             openapi_extra=json_body(TOKEN_SCHEMA, {"count": 2, "ttl_s": 3600}))  # fmt: skip
async def enrolment_tokens(state: State, body: Annotated[Any, Body()]) -> dict[str, Any]:
    req: TokenRequest = _body(body, TokenRequest)
    s = state.settings
    ttl = s.enrol_token_ttl_s if req.ttl_s is None else req.ttl_s
    if ttl > s.enrol_token_max_ttl_s:
        raise JobError("validation", f"ttl_s {ttl:g} > enrol_token_max_ttl_s "
                                     f"{s.enrol_token_max_ttl_s:g}")  # fmt: skip
    tokens, expires = await _enroller(state).issue(
        req.count, ttl, device_id=req.device_id or "", label=req.label
    )
    return {"tokens": tokens, "expires_ts": expires, "device_id": req.device_id}


ENROL_EXAMPLE = {"token": "<an enrolment token>", "device_id": "phone-1"}


@router.post("/v1/enrol", status_code=201,
             responses={**R400, **R403, **R404, **R409, **R422, **R503},
             openapi_extra=json_body(ENROL_SCHEMA, ENROL_EXAMPLE))  # fmt: skip
async def enrol(state: State, body: Annotated[Any, Body()]) -> dict[str, Any]:
    try:
        req: EnrolRequest = _body(body, EnrolRequest)
    except JobError:
        state.metrics.enrolments.labels(outcome="invalid_request").inc()
        raise
    try:
        password, ts = await _enroller(state).enrol(req.token, req.device_id)
    except EnrolmentRefused as exc:
        if exc.code in ("bad_id", "reserved_id"):
            raise JobError(exc.code, exc.detail) from None
        raise HTTPException(409 if exc.code == "already_enrolled" else 403,
                            f"{exc.code}: {exc.detail}") from None  # fmt: skip
    except EnrolmentUnavailable as exc:
        raise _unavailable(exc) from None
    s = state.settings
    # its brokers in its own order (schemas.brokers): home first, then where it fails over
    order = broker_for(req.device_id, s.device_brokers)
    home = order[0]
    ca = ""
    if s.mqtt_cafile is not None:
        ca = s.mqtt_cafile.read_text()
    return {
        "device_id": req.device_id,
        "enrolled_ts": ts,
        "mqtt": {"host": home.host, "port": home.port, "tls": home.tls,
                 "username": req.device_id, "password": password,
                 "topic_root": s.mqtt_topic_root,
                 "brokers": [{"host": b.host, "port": b.port, "tls": b.tls} for b in order]},
        "ca_pem": ca,
        "model_signing_key": state.signer.public_hex,
    }


@router.post("/v1/devices/{device_id}/revoke", dependencies=[Depends(admin)],
             responses={**R401, **R404, **R422, **R503})  # fmt: skip
async def revoke(
    state: State, device_id: Annotated[str, Path(max_length=128)]
) -> dict[str, Any]:
    try:
        ts = await _enroller(state).revoke(device_id)
    except EnrolmentUnavailable as exc:
        raise _unavailable(exc) from None
    return {"device_id": device_id, "revoked_ts": ts}
