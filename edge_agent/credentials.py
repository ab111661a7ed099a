"""The device's own credential: enrolment once, then kept in its state directory.

``fedfleet agent enrol --api URL --token T --device-id ID --state-dir D`` trades an
operator's one-use enrolment token for this device's credential (``POST /v1/enrol``) and
writes, under ``D``::

    credential.json   0600  device id, broker host/port/TLS (its home broker, and the
                            brokers to fail over to when there are several), MQTT
                            username and password,
                            the model-signing key to pin, the coordinator's URL
    ca.pem            0644  the fleet CA the broker's (and the API's) certificate chains to

``apply(settings)`` fills an agent's broker address, username, password, CA and pinned key
from that file (values set explicitly win) and turns trust on first use off; ``fedfleet
agent`` does it whenever its state directory holds one. A credential file that group or
others can read is refused: a password another user of the device can read is not this
device's any more.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge_agent.errors import AgentError
from edge_agent.settings import AgentSettings
from schemas import mqtt_auth
from schemas.atomic import atomic_write
from schemas.topics import DEFAULT_ROOT

CREDENTIAL_FILE = "credential.json"
CA_FILE = "ca.pem"


class CredentialError(AgentError):
    """Enrolment failed, or the stored credential cannot be used (codes: enrol_refused,
    enrol_unreachable, credential_file, credential_mode, device_id)."""


def https_verify(cafile: Path | None, field: str) -> ssl.SSLContext | bool:
    """What an HTTP client checks the coordinator's certificate against: ``cafile`` only
    (the fleet CA), or the system's trust store when None; an unreadable CA is an
    ``AgentError`` naming the setting ``field``."""
    if cafile is None:
        return True
    try:
        return mqtt_auth.tls_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(field, f"cannot load {cafile}: {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceCredential:
    device_id: str
    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool
    username: str
    password: str
    model_signing_key: str
    api_url: str
    enrolled_ts: float
    mqtt_topic_root: str = DEFAULT_ROOT  # credentials stored before roots existed: "fleet"
    # several brokers (schemas.brokers): host:port of the ones after mqtt_host:mqtt_port
    # (the home broker) in this device's failover order; () for a single broker
    mqtt_failover: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print the secret
        return (f"DeviceCredential(device_id={self.device_id!r}, "
                f"mqtt={self.mqtt_host}:{self.mqtt_port})")  # fmt: skip

    def public(self) -> dict[str, Any]:
        """What may be printed or logged (no password)."""
        d = dataclasses.asdict(self)
        d.pop("password")
        return d


def save(state_dir: Path, cred: DeviceCredential, ca_pem: str) -> Path:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: owner-only
    if ca_pem:
        atomic_write(state_dir / CA_FILE, ca_pem.encode(), mode=0o644)
    path = state_dir / CREDENTIAL_FILE
    atomic_write(path, json.dumps(dataclasses.asdict(cred), indent=1).encode(), mode=0o600)
    return path


def load(state_dir: Path) -> DeviceCredential | None:
    """The stored credential (None: this device has not enrolled)."""
    path = state_dir / CREDENTIAL_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError("credential_file", f"cannot read {path}: {exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise CredentialError(
            "credential_mode", f"{path} is readable by group or others: chmod 600 it "
            "(or revoke this device and enrol it again)")  # fmt: skip
    try:
        raw = json.loads(path.read_bytes())
        raw["mqtt_failover"] = tuple(raw.get("mqtt_failover", ()))
        return DeviceCredential(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError("credential_file", f"{path} is not a credential: {exc}") from None


def apply(settings: AgentSettings, cred: DeviceCredential | None = None) -> AgentSettings:
    """``settings`` with the broker, username, password, CA and pinned key of the stored
    credential (from ``settings.state_dir`` unless ``cred`` is given); unchanged when
    there is none. A credential of another device id is refused."""
    if cred is None:
        if settings.state_dir is None:
            return settings
        cred = load(settings.state_dir)
        if cred is None:
            return settings
    if cred.device_id != settings.device_id:
        raise CredentialError("device_id", f"the stored credential is {cred.device_id!r}'s, "
                                           f"not {settings.device_id!r}'s")  # fmt: skip
    ca = settings.state_dir / CA_FILE if settings.state_dir is not None else None
    changes: dict[str, Any] = {
        "mqtt_host": cred.mqtt_host, "mqtt_port": cred.mqtt_port,
        "mqtt_topic_root": cred.mqtt_topic_root, "mqtt_failover": cred.mqtt_failover,
        "mqtt_username": settings.mqtt_username or cred.username,
        "mqtt_password": settings.mqtt_password or cred.password,
        "public_key_hex": settings.public_key_hex or cred.model_signing_key,
        "require_pinned_key": True,  # the key from enrolment; never one fetched later
    }  # fmt: skip
    have_ca = ca is not None and ca.exists()
    if cred.mqtt_tls and settings.mqtt_cafile is None:
        if not have_ca:
            raise CredentialError("credential_file", f"the credential needs TLS but {ca} is "
                                                     "missing")  # fmt: skip
        changes["mqtt_cafile"] = ca
    if settings.api_url.startswith("https://") and settings.api_cafile is None and have_ca:
        changes["api_cafile"] = ca  # the coordinator's certificate is the fleet CA's too
    return dataclasses.replace(settings, **changes)


async def request_credential(
    http: httpx.AsyncClient, api_url: str, token: str, device_id: str
) -> tuple[DeviceCredential, str]:
    """``POST /v1/enrol``: this device's credential and the fleet CA (PEM), not stored
    (a simulated fleet keeps them in memory; ``enrol`` writes them to a state directory)."""
    url = api_url.rstrip("/") + "/v1/enrol"
    try:
        r = await http.post(url, json={"token": token, "device_id": device_id})
    except httpx.HTTPError as exc:
        raise CredentialError("enrol_unreachable", f"POST {url}: {exc!r}") from None
    if r.status_code != 201:
        try:
            detail = str(r.json().get("detail", ""))
        except ValueError:
            detail = r.text[:200]
        raise CredentialError("enrol_refused", f"{r.status_code}: {detail}")
    body = r.json()
    m = body["mqtt"]
    cred = DeviceCredential(
        device_id=body["device_id"], mqtt_host=m["host"], mqtt_port=int(m["port"]),
        mqtt_tls=bool(m["tls"]), username=m["username"], password=m["password"],
        model_signing_key=body["model_signing_key"], api_url=api_url,
        enrolled_ts=float(body["enrolled_ts"]),
        mqtt_topic_root=str(m.get("topic_root") or DEFAULT_ROOT),
        mqtt_failover=tuple(f"{b['host']}:{int(b['port'])}" for b in m.get("brokers", [])[1:]),
    )  # fmt: skip
    return cred, str(body.get("ca_pem", ""))


async def issue_token(
    http: httpx.AsyncClient, api_url: str, admin_token: str, device_id: str, *,
    ttl_s: float = 600.0,
) -> str:  # fmt: skip
    """``POST /v1/enrolment-tokens`` as the operator: one token, bound to ``device_id``."""
    url = api_url.rstrip("/") + "/v1/enrolment-tokens"
    body = {"count": 1, "ttl_s": ttl_s, "device_id": device_id, "label": "fedfleet agent enrol"}
    try:
        r = await http.post(url, json=body, headers={"Authorization": f"Bearer {admin_token}"})
    except httpx.HTTPError as exc:
        raise CredentialError("enrol_unreachable", f"POST {url}: {exc!r}") from None
    if r.status_code != 201:
        raise CredentialError("token_refused", f"POST {url}: {r.status_code} {r.text[:200]}")
    return str(r.json()["tokens"][0])


async def enrol(
    http: httpx.AsyncClient, api_url: str, token: str, device_id: str, state_dir: Path
) -> DeviceCredential:
    """Trade ``token`` for this device's credential and store it in ``state_dir``. Over
    ``https://`` the client must already trust the coordinator (``fedfleet agent enrol
    --ca``: the fleet CA the operator hands out with the token), or the token could go to
    whoever answers."""
    cred, ca_pem = await request_credential(http, api_url, token, device_id)
    save(state_dir, cred, ca_pem)
    return cred
