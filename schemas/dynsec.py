"""Mosquitto's dynamic-security plugin: the fleet's roles, its initial config file, and the
``$CONTROL/dynamic-security/v1`` commands, as plain dicts (no I/O).

A device is a dynsec *client*: username = device id, password = a random secret, holding
its own role ``device:<id>`` whose literal ACLs confine it to ``fleet/<id>/...``
(Mosquitto 2.0's dynsec does not substitute ``%u``, so one shared ``fleet/%u/#`` role
would match nothing; ``enrol_device`` creates both). The ``coordinator`` client holds the
``coordinator`` role (every device's ingest leaves in, device-bound leaves out) and the
``fleet-admin`` role (the ``$CONTROL`` API: enrol, disable, delete devices). Everything
not granted is denied (``defaultACLAccess`` all false). The ACL table: docs/security.md.

The file format is the plugin's own (Mosquitto 2.0): each client has ``password`` =
base64(PBKDF2-HMAC-SHA512(password, salt, iterations, 64 bytes)), ``salt`` = base64 of 12
random bytes, ``iterations`` (101, what ``mosquitto_ctrl dynsec init`` and the plugin's
``createClient`` use). tests/test_stack_secure.py checks ``hash_password`` against a file
written by ``mosquitto_ctrl dynsec init``.

The command builders only build dicts, so a service can send them over its own MQTT
session; ``coordinator.broker_admin.DynsecClient`` is the aiomqtt sender the coordinator
(enrolment, revocation) and the tests use; ``stack.mqtt`` writes the initial file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.errors import FedfleetError
from schemas.messages import ID_PATTERN
from schemas.topics import DEFAULT_ROOT, check_root


class DynsecError(FedfleetError):
    """Mosquitto's dynamic-security plugin answered a command with an error (or not at all),
    or a name is not one it may hold."""

    code = "dynsec"

    def __init__(self, message: str) -> None:
        super().__init__("", message)

    def __str__(self) -> str:
        return self.detail or self.code

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

# fleet/<id>/<leaf>, device -> coordinator (coordinator.link.INGEST_LEAVES; status is also
# the device's retained last will)
INGEST_LEAVES = ("telemetry", "status", "task_status", "update", "report")
# fleet/<id>/<leaf>, coordinator -> device (dispatcher: task, uploads: ack, selector: pace)
DEVICE_BOUND_LEAVES = ("task", "ack", "pace")

DEVICE_ROLE = "device"
COORDINATOR_ROLE = "coordinator"
ADMIN_ROLE = "fleet-admin"
COORDINATOR_USER = "coordinator"
# the password-file store's reload probe (schemas.passwd): never a device
PROBE_USER = "coordinator-probe"
RESERVED_USERNAMES = frozenset({COORDINATOR_USER, PROBE_USER})
# the wire's device id (schemas.messages.Id): never "/", "+" or "#", so "fleet/<id>/#"
# cannot widen to other devices' topics
DEVICE_ID_PATTERN = ID_PATTERN
DEVICE_ID_MAX = 128

ITERATIONS = 101  # Mosquitto 2.0's default (mosquitto_ctrl and createClient)
SALT_BYTES = 12  # Mosquitto 2.0's default
HASH_BYTES = 64  # SHA-512 output
PASSWORD_BYTES = 32  # a device secret: 256 random bits

ACL_TYPES = (
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
)
DENY_ALL = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": False,
}

JSON = dict[str, Any]


def new_password() -> str:
    """A random device (or coordinator) secret, URL-safe text of 256 bits."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS
) -> JSON:
    """The ``password``/``salt``/``iterations`` fields of a dynsec client entry."""
    if not password:
        raise DynsecError("dynsec: an empty password cannot be hashed")
    if iterations < 1:
        raise DynsecError(f"dynsec: iterations must be >= 1, not {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def verify_password(entry: Mapping[str, Any], password: str) -> bool:
    """True when ``password`` matches a client entry (as the plugin checks it)."""
    try:
        salt = base64.b64decode(entry["salt"], validate=True)
        want = base64.b64decode(entry["password"], validate=True)
        iterations = int(entry["iterations"])
    except (KeyError, ValueError, TypeError):
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
    return secrets.compare_digest(got, want)


def check_device_id(device_id: str) -> str:
    """``device_id`` if it can be a dynsec username that ``%u`` patterns confine: the wire
    ``Id`` (letters, digits, ``._:-``: never ``/``, ``+``, ``#``), and not a reserved name."""
    if len(device_id) > DEVICE_ID_MAX or not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise DynsecError(
            f"dynsec: {device_id!r} is not a valid device id "
            f"(1..{DEVICE_ID_MAX} of letters, digits and ._:-)"
        )
    if device_id in RESERVED_USERNAMES:
        raise DynsecError(f"dynsec: {device_id!r} is reserved")
    return device_id


# ------------------------------------------------------------------ roles


def acl(acltype: str, topic: str, *, allow: bool = True, priority: int = 0) -> JSON:
    if acltype not in ACL_TYPES:
        raise DynsecError(f"dynsec: unknown acltype {acltype!r}")
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def _sub_unsub(topic: str) -> list[JSON]:
    return [acl("subscribePattern", topic), acl("unsubscribePattern", topic)]


def device_rolename(device_id: str) -> str:
    return f"{DEVICE_ROLE}:{device_id}"


def device_acls(device_id: str, root: str = DEFAULT_ROOT) -> list[JSON]:
    """One device: publish its own ingest leaves, subscribe to and read
    ``<root>/<itself>/#`` (task, ack, pace). Literal topics: Mosquitto 2.0's dynsec does
    not substitute ``%u`` (2.1 does), hence a role per device."""
    own = f"{check_root(root)}/{check_device_id(device_id)}"
    acls = [acl("publishClientSend", f"{own}/{leaf}") for leaf in INGEST_LEAVES]
    return [*acls, *_sub_unsub(f"{own}/#"), acl("publishClientReceive", f"{own}/#")]


def coordinator_role(roots: Sequence[str] = (DEFAULT_ROOT,)) -> JSON:
    """The coordinator: read every device's ingest leaves (plain and ``$share``), write
    every device's device-bound leaves, under each topic root it serves."""
    acls: list[JSON] = []
    for root in map(check_root, roots):
        for leaf in INGEST_LEAVES:
            acls += _sub_unsub(f"{root}/+/{leaf}")
            acls += _sub_unsub(f"$share/+/{root}/+/{leaf}")
            acls.append(acl("publishClientReceive", f"{root}/+/{leaf}"))
        acls += [acl("publishClientSend", f"{root}/+/{leaf}") for leaf in DEVICE_BOUND_LEAVES]
    return {"rolename": COORDINATOR_ROLE, "textname": "speaks for the fleet", "acls": acls}


def admin_role() -> JSON:
    """The dynsec API (``$CONTROL/dynamic-security/#``): enrol, disable, delete devices."""
    topic = "$CONTROL/dynamic-security/#"
    acls = [
        acl("publishClientSend", topic),
        acl("publishClientReceive", topic),
        *_sub_unsub(topic),
    ]
    return {"rolename": ADMIN_ROLE, "textname": "manages fleet credentials", "acls": acls}


def client_entry(
    username: str, password: str, roles: Sequence[str], *, textname: str = "", **hash_kw: Any
) -> JSON:
    entry: JSON = {"username": username, "textname": textname}
    entry.update(hash_password(password, **hash_kw))
    entry["roles"] = [{"rolename": r} for r in roles]
    return entry


def initial_config(coordinator_password: str, *, iterations: int = ITERATIONS,
                   roots: Sequence[str] = (DEFAULT_ROOT,)) -> JSON:  # fmt: skip
    """The plugin's config file at first start: the coordinator client and its two roles,
    no devices (the coordinator enrols them over ``$CONTROL``), everything else denied."""
    coordinator = client_entry(
        COORDINATOR_USER,
        coordinator_password,
        (COORDINATOR_ROLE, ADMIN_ROLE),
        textname="fedfleet coordinator",
        iterations=iterations,
    )
    return {
        "clients": [coordinator],
        "groups": [],
        "roles": [coordinator_role(roots), admin_role()],
        "defaultACLAccess": dict(DENY_ALL),
    }


# ------------------------------------------------------------------ $CONTROL commands


def commands(*cmds: JSON) -> JSON:
    """The payload to publish on ``CONTROL_TOPIC`` (the plugin answers on RESPONSE_TOPIC)."""
    return {"commands": list(cmds)}


def create_client(
    username: str,
    password: str,
    *,
    roles: Iterable[str] = (),
    textname: str = "",
    clientid: str = "",
) -> JSON:
    """A new client named like a device (``clientid`` non-empty pins the MQTT client id
    too); ``enrol_device`` is the whole enrolment."""
    cmd: JSON = {
        "command": "createClient",
        "username": check_device_id(username),
        "password": password,
        "roles": [{"rolename": r, "priority": -1} for r in roles],
    }
    if textname:
        cmd["textname"] = textname
    if clientid:
        cmd["clientid"] = clientid
    return cmd


def create_role(rolename: str, acls: Iterable[JSON], *, textname: str = "") -> JSON:
    cmd: JSON = {"command": "createRole", "rolename": rolename, "acls": list(acls)}
    if textname:
        cmd["textname"] = textname
    return cmd


def delete_role(rolename: str) -> JSON:
    return {"command": "deleteRole", "rolename": rolename}


def enrol_device(device_id: str, password: str, root: str = DEFAULT_ROOT) -> list[JSON]:
    """The commands that let ``device_id`` in with ``password``, confined to its topics
    under ``root`` (its own role first, then the client holding it; one batch)."""
    role = device_rolename(device_id)
    return [
        create_role(role, device_acls(device_id, root), textname=f"device {device_id}"),
        create_client(device_id, password, roles=(role,)),
    ]


def revoke_device(device_id: str) -> list[JSON]:
    """The commands that remove ``device_id`` (its live sessions are disconnected)."""
    return [delete_client(check_device_id(device_id)), delete_role(device_rolename(device_id))]


def delete_client(username: str) -> JSON:
    """Remove a device; the plugin also disconnects its live sessions."""
    return {"command": "deleteClient", "username": username}


def disable_client(username: str) -> JSON:
    """Refuse a device's connections (and kick its live sessions) but keep its entry."""
    return {"command": "disableClient", "username": username}


def enable_client(username: str) -> JSON:
    return {"command": "enableClient", "username": username}


def set_client_password(username: str, password: str) -> JSON:
    """Rotate a device's secret (the old one stops working for new connections)."""
    return {"command": "setClientPassword", "username": username, "password": password}


def add_client_role(username: str, rolename: str, *, priority: int = -1) -> JSON:
    return {
        "command": "addClientRole",
        "username": username,
        "rolename": rolename,
        "priority": priority,
    }


def remove_client_role(username: str, rolename: str) -> JSON:
    return {"command": "removeClientRole", "username": username, "rolename": rolename}


def get_client(username: str) -> JSON:
    return {"command": "getClient", "username": username}


def list_clients() -> JSON:
    return {"command": "listClients", "verbose": False, "count": -1, "offset": 0}


def responses(payload: bytes) -> list[JSON]:
    """The ``responses`` of a reply on RESPONSE_TOPIC (``DynsecError`` when malformed)."""
    try:
        doc = json.loads(payload)
        out = doc["responses"]
    except (ValueError, TypeError, KeyError) as exc:
        raise DynsecError(f"dynsec: malformed response ({exc})") from None
    if not isinstance(out, list) or not all(isinstance(r, dict) for r in out):
        raise DynsecError("dynsec: malformed response (responses is not a list of objects)")
    return out


def raise_for_errors(replies: Iterable[Mapping[str, Any]]) -> None:
    """``DynsecError`` naming the first command the plugin refused."""
    for reply in replies:
        if reply.get("error"):
            raise DynsecError(f"dynsec: {reply.get('command')} failed: {reply['error']}")
