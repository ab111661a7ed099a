"""Shared pieces of the REST routes: the error body, the admin check, declared answers.

Every error answer is JSON ``{"detail": "<one line>"}`` (:class:`ErrorBody`), and every
route declares the answers it can give (``responses=``), so the OpenAPI document is the
contract schemathesis checks.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from coordinator.api.state import AppState, app_state


class ErrorBody(BaseModel):
    detail: str


Responses = dict[int | str, dict[str, Any]]


def _err(code: int, description: str) -> Responses:
    return {code: {"model": ErrorBody, "description": description}}


R400 = _err(400, "the body could not be read as JSON text (not UTF-8)")
R401 = _err(401, "missing or wrong admin bearer token")
R404 = _err(404, "unknown job, device or model version")
R409 = _err(409, "the job exists")
R422 = _err(422, "invalid body or parameters")
R503 = _err(503, "a store (Redis, Kafka) is unavailable; retry later")
R304: Responses = {304: {"description": "not modified (If-None-Match matched the ETag)"}}
BINARY: dict[str, Any] = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}}}  # fmt: skip

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <admin_token>")


def _bearer_ok(creds: HTTPAuthorizationCredentials | None, *tokens: str) -> bool:
    """``creds`` is ``Bearer <t>`` for one of the (non-empty) ``tokens``, compared in
    constant time."""
    if creds is None or creds.scheme.lower() != "bearer":
        return False
    got = creds.credentials.encode()
    return any(hmac.compare_digest(got, t.encode()) for t in tokens if t)


def _refuse(state: AppState, what: str, creds: object, detail: str) -> HTTPException:
    why = "missing" if creds is None else "wrong"
    state.metrics.auth_refused.labels(what=what, reason=why).inc()
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def admin(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    state: Annotated[AppState, Depends(app_state)],
) -> None:
    """Write endpoints need ``Authorization: Bearer <admin_token>``."""
    if not _bearer_ok(creds, state.settings.admin_token):
        raise _refuse(state, "admin", creds, "missing or wrong bearer token")


def fleet_reader(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    state: Annotated[AppState, Depends(app_state)],
) -> None:
    """Fleet-status reads (every device's battery, network, task): with
    ``fleet_reads_need_token`` they need the admin token or the read-only operator token."""
    s = state.settings
    if s.fleet_reads_need_token and not _bearer_ok(creds, s.admin_token, s.operator_token):
        raise _refuse(state, "operator", creds,
                      "fleet status needs the operator or admin bearer token")  # fmt: skip


def not_modified(inm: str | None, etag: str) -> bool:
    if not inm:
        return False
    tags = [t.strip() for t in inm.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def signed_headers(etag: str, digest: str, sig: str) -> dict[str, str]:
    return {
        "ETag": etag,
        "X-Fedfleet-Digest": f"sha256={digest}",
        "X-Fedfleet-Signature": sig,
        "Cache-Control": "no-cache",
    }
