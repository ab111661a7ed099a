"""A simulated fleet enrols the way real devices do: operator tokens, then ``POST /v1/enrol``.

``enrol_fleet`` asks the coordinator for one one-use token per device (admin token, up to
1,000 per request) and trades each for that device's credential
(``edge_agent.credentials.request_credential``, ``concurrency`` at a time). The simulator
keeps the credentials in memory (its devices have no state directories); the broker's
credential store is the one the coordinator manages, so what the fleet connects with is
exactly what an enrolled phone would. On the stack's default store (the broker's
password file, rewritten in batches) concurrent enrolments share a broker reload, so
more in flight is faster; on the dynamic-security store the cost per enrolment grows
with the fleet (BENCHMARKS.md, "Enrolment cost").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge_agent.credentials import DeviceCredential, request_credential
from sim.services import ServiceSet

TOKENS_PER_REQUEST = 1000


async def enrol_fleet(
    http: httpx.AsyncClient, api_url: str, admin_token: str, device_ids: Sequence[str], *,
    concurrency: int = 64, ttl_s: float = 3600.0,
) -> dict[str, DeviceCredential]:  # fmt: skip
    """Every device's credential, by id (raises ``CredentialError`` on the first refusal)."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    base = api_url.rstrip("/")
    tokens: list[str] = []
    for i in range(0, len(device_ids), TOKENS_PER_REQUEST):
        n = len(device_ids[i : i + TOKENS_PER_REQUEST])
        body = {"count": n, "ttl_s": ttl_s, "label": "simulated fleet"}
        r = await http.post(f"{base}/v1/enrolment-tokens", headers=auth, json=body)
        r.raise_for_status()
        tokens += r.json()["tokens"]
    slots = asyncio.Semaphore(concurrency)
    out: dict[str, DeviceCredential] = {}

    async def one(token: str, device_id: str) -> None:
        async with slots:
            cred, _ = await request_credential(http, base, token, device_id)
            out[device_id] = cred

    await asyncio.gather(*(one(t, d) for t, d in zip(tokens, device_ids, strict=True)))
    return out


@dataclass(frozen=True)
class EnrolledFleet:
    """What a simulated fleet connects with: its devices' credentials and the fleet CA
    (both None on an anonymous stack), and how long enrolling them took."""

    credentials: dict[str, DeviceCredential] | None = None
    ca_file: Path | None = None
    seconds: float = 0.0


async def enrol_if_secure(
    http: httpx.AsyncClient, services: ServiceSet, device_ids: Sequence[str]
) -> EnrolledFleet:
    """On a secure stack every device enrols first (``enrol_fleet`` with the services'
    admin token); on an anonymous one there is nothing to do."""
    info = services.info
    if not info.mqtt_tls:
        return EnrolledFleet()
    t0 = time.monotonic()
    creds = await enrol_fleet(http, services.rest_url, services.admin_token, device_ids)
    return EnrolledFleet(creds, Path(info.mqtt_cafile), time.monotonic() - t0)
