"""A thin, synchronous REST client of the coordinator's job routes, for ``fedfleet job``.

Errors (each one line, with the exit status the CLI gives it)::

    FedfleetError (schemas.errors)
        JobCliError              exit_code 1: the coordinator refused (4xx/5xx), a bad job file
            Unreachable          exit_code 2: no answer at the coordinator URL
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge_agent.credentials import https_verify
from schemas.errors import FedfleetError
from stack import envfile

DEFAULT_TOKEN = "change-me"  # CoordinatorSettings.admin_token's default


class JobCliError(FedfleetError):
    """A request the coordinator refused, or input the job CLI cannot use."""

    code = "job"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)

    def __str__(self) -> str:
        return self.detail


class Unreachable(JobCliError):
    """Nothing answered at the coordinator URL."""

    code = "unreachable"
    exit_code = 2


@dataclass(frozen=True, kw_only=True)
class Target:
    """Which coordinator, as whom: flag > env > stack file > default, field by field."""

    url: str = envfile.DEFAULT_COORDINATOR_URL
    token: str = DEFAULT_TOKEN
    ca_file: str = ""  # an https:// coordinator's certificate chains to this CA ("": system)

    @classmethod
    def resolve(cls, url: str | None = None, token: str | None = None) -> Target:
        env = os.environ
        sf = None
        if (not (url or env.get(envfile.URL_VAR)) or not (token or env.get(envfile.TOKEN_VAR))
                or not env.get(envfile.CA_VAR)):  # fmt: skip
            sf = envfile.read()
        return cls(
            ca_file=env.get(envfile.CA_VAR) or (sf.info.mqtt_cafile if sf else ""),
            url=(url or env.get(envfile.URL_VAR) or (sf.coordinator_url if sf else "")
                 or envfile.DEFAULT_COORDINATOR_URL).rstrip("/"),
            token=(token or env.get(envfile.TOKEN_VAR) or (sf.admin_token if sf else "")
                   or DEFAULT_TOKEN),
        )  # fmt: skip


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip().splitlines()[0][:300] if r.text.strip() else r.reason_phrase
    d = body.get("detail") if isinstance(body, dict) else body
    if isinstance(d, list):  # FastAPI validation errors
        d = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in d)
    return " ".join(str(d).split())[:500]


class JobClient:
    """``GET/POST /v1/jobs...`` with the admin bearer token; use as a context manager."""

    def __init__(self, target: Target, *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.target = target
        https_ca = target.ca_file and target.url.startswith("https://")
        verify = https_verify(Path(target.ca_file) if https_ca else None, "ca_file")
        self._http = httpx.Client(
            base_url=target.url, timeout=timeout, transport=transport, verify=verify,
            headers={"Authorization": f"Bearer {target.token}"},
        )  # fmt: skip

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, json: Any = None, ok_404: bool = False,
              content: bytes | None = None, params: dict[str, str] | None = None,
              ) -> Any:  # fmt: skip
        try:
            r = self._http.request(method, path, json=json, content=content, params=params)
        except httpx.InvalidURL as exc:
            raise JobCliError(f"bad coordinator URL {self.target.url!r}: {exc}") from None
        except httpx.HTTPError as exc:
            raise Unreachable(
                f"coordinator at {self.target.url} does not answer ({type(exc).__name__}); "
                "start it, or pass --url / FEDFLEET_COORDINATOR_URL"
            ) from None
        if r.status_code == 404 and ok_404:
            return None
        if r.status_code == 401:
            raise JobCliError(f"{method} {path}: the coordinator refused the admin token "
                              "(--token / FEDFLEET_ADMIN_TOKEN)")  # fmt: skip
        if r.status_code >= 300:
            raise JobCliError(f"{method} {path}: {r.status_code} {_detail(r)}")
        try:
            return r.json()
        except ValueError:
            raise JobCliError(f"{method} {path}: the answer is not JSON") from None

    def upload_artifact(self, data: bytes, trainable: list[str] | None = None) -> dict[str, Any]:
        """``POST /v1/artifacts``: the stored artifact and the ``spec`` a job names it by."""
        params = {"trainable": ",".join(trainable)} if trainable else None
        out: dict[str, Any] = self._call("POST", "/v1/artifacts", content=data, params=params)
        return out

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._call("POST", "/v1/jobs", json=body)
        return out

    def list(self) -> list[dict[str, Any]]:
        out = self._call("GET", "/v1/jobs")
        return list(out.get("jobs", [])) if isinstance(out, dict) else []

    def get(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return out

    def metrics(self, job_id: str) -> dict[str, Any] | None:
        """The job's federated evaluations, None where the coordinator has no such route."""
        out = self._call("GET", f"/v1/jobs/{job_id}/metrics", ok_404=True)
        return out if isinstance(out, dict) else None

    def stop(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/stop")
        return out


__all__ = ["JobCliError", "JobClient", "Target", "Unreachable"]
