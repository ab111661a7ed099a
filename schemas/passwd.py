"""Mosquitto's password file and ACL file for the fleet (no I/O): the credential store
that scales to a large fleet (docs/security.md, "Two credential stores").

A device is a line ``<id>:$7$<iterations>$<salt>$<hash>`` of the password file (the
format ``mosquitto_passwd`` writes: PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations; the
same hash as ``schemas.dynsec``). The ACL file is static and binds each device to its
own topics with ``%u`` patterns (the username *is* the device id, so what a device may
touch follows from its credential, not from what it claims): a device may publish only
``fleet/<itself>/<ingest leaf>`` and receive only ``fleet/<itself>/...``; the coordinator
user reads every device's ingest leaves and writes every device's device-bound leaves.

Mosquitto 2.0's ACL file filters publishes and deliveries but grants every SUBSCRIBE
(its default check does not look at subscriptions): a device subscribed to ``fleet/#``
gets a SUBACK and is then sent only its own topics. tests/test_broker_passwd.py shows it.

The coordinator changes the file and makes the broker reload it (SIGHUP); a reload is
confirmed by the ``PROBE_USER`` line, whose password changes with every write: once the
probe's new password connects, the broker runs the new file
(``coordinator.broker_passwd``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence

from schemas import dynsec
from schemas.dynsec import COORDINATOR_USER, DEVICE_BOUND_LEAVES, INGEST_LEAVES, DynsecError
from schemas.topics import DEFAULT_ROOT, check_root

PROBE_USER = dynsec.PROBE_USER
_HASH = re.compile(r"\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


class PasswdError(DynsecError):
    """A password file that is not one Mosquitto would load, or a name it may not hold."""

    code = "passwd"


def hash_field(password: str, *, salt: bytes | None = None,
               iterations: int = dynsec.ITERATIONS) -> str:  # fmt: skip
    """The part after ``username:``, as ``mosquitto_passwd`` writes it."""
    h = dynsec.hash_password(password, salt=salt, iterations=iterations)
    return f"$7${h['iterations']}${h['salt']}${h['password']}"


def verify(field: str, password: str) -> bool:
    """True when ``password`` matches a hash field (as Mosquitto checks it)."""
    m = _HASH.fullmatch(field)
    if m is None:
        return False
    entry = {"iterations": m.group(1), "salt": m.group(2), "password": m.group(3)}
    return dynsec.verify_password(entry, password)


def parse(text: str) -> dict[str, str]:
    """username -> hash field, in file order; ``PasswdError`` for a line Mosquitto would
    refuse (no ``:``, an unknown hash format, a username twice)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, field = line.partition(":")
        m = _HASH.fullmatch(field)
        if not sep or not user or m is None:
            raise PasswdError(f"password file line {n}: not 'user:$7$iterations$salt$hash'")
        try:
            base64.b64decode(m.group(2), validate=True)
        except ValueError:
            raise PasswdError(f"password file line {n}: the salt is not base64") from None
        if user in out:
            raise PasswdError(f"password file line {n}: {user!r} appears twice")
        out[user] = field
    return out


def render(entries: Mapping[str, str]) -> bytes:
    """The file for ``entries`` (username -> hash field)."""
    for user in entries:
        if not user or ":" in user or any(c.isspace() for c in user):
            raise PasswdError(f"{user!r} cannot be a password-file username")
    return "".join(f"{u}:{f}\n" for u, f in entries.items()).encode()


def initial(coordinator_password: str, probe_password: str) -> bytes:
    """The file at first start: the coordinator and the probe, no devices."""
    return render({COORDINATOR_USER: hash_field(coordinator_password),
                   PROBE_USER: hash_field(probe_password)})  # fmt: skip


def apply(entries: dict[str, str], changes: Iterable[tuple[str, str | None]]) -> None:
    """Apply ``(device_id, hash field or None to remove)`` in order, in place; only
    device ids (``dynsec.check_device_id``) may be changed."""
    for device_id, field in changes:
        dynsec.check_device_id(device_id)
        if field is None:
            entries.pop(device_id, None)
        else:
            entries[device_id] = field


def acl_text(roots: Sequence[str] = (DEFAULT_ROOT,)) -> str:
    """The broker's ACL file (Mosquitto ``acl_file`` syntax), for the deployments' topic
    ``roots`` (``schemas.topics``; one per deployment sharing the broker)."""
    roots = [check_root(r) for r in roots]
    lines = ["# fedfleet: written by the stack (schemas/passwd.py); devices are confined by %u",
             f"user {COORDINATOR_USER}"]  # fmt: skip
    for root in roots:
        lines += [f"topic read {root}/+/{leaf}" for leaf in INGEST_LEAVES]
        lines += [f"topic write {root}/+/{leaf}" for leaf in DEVICE_BOUND_LEAVES]
    lines += ["", "# every other user is a device: its own ingest leaves out, its own topics in"]
    for root in roots:
        lines += [f"pattern write {root}/%u/{leaf}" for leaf in INGEST_LEAVES]
        lines += [f"pattern read {root}/%u/#"]
    lines += [""]
    return "\n".join(lines)
