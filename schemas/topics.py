"""MQTT topic names: ``<root>/<device_id>/<leaf>``, the root one per deployment.

Two deployments sharing a broker (each with its own ``topic_prefix`` for Kafka and Redis)
also need their own MQTT topics, or each coordinator ingests the other's devices: their
telemetry, their uploads (refused ``foreign_task``), their status. The root is that
namespace: ``fleet`` by default, ``mqtt_topic_root`` in the coordinator's settings, told
to every device at enrolment (the agent's ``mqtt_topic_root``), and part of the broker's
ACLs (``schemas.passwd``, ``schemas.dynsec``).

Coordinator code names a device topic canonically, ``fleet/<id>/<leaf>``
(:data:`CANONICAL`); its MQTT link maps the canonical root to the deployment's root on
the wire (:func:`to_wire`, :func:`from_wire`), so a root is one setting, not a parameter
threaded through every publish. Pure: no I/O.
"""

from __future__ import annotations

import re

from schemas.errors import SettingsError

DEFAULT_ROOT = CANONICAL = "fleet"
# a single topic level; no MQTT wildcards, no "$" (broker-internal topics), no "/"
ROOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_root(root: str, field: str = "mqtt_topic_root") -> str:
    """``root`` if it is one plain topic level (letters, digits, ``._-``; at most 64),
    else a ``SettingsError`` naming ``field``."""
    if not ROOT_RE.match(root):
        raise SettingsError(field, f"{root!r} is not a topic root: one level of letters, "
                                   "digits and ._- (at most 64), no /, +, # or $")  # fmt: skip
    return root


def to_wire(topic: str, root: str) -> str:
    """The canonical ``topic`` under ``root`` (topics outside the canonical root, e.g.
    ``$share/...`` filters or ``$CONTROL``, are left as they are)."""
    if root == CANONICAL or not topic.startswith(CANONICAL + "/"):
        return topic
    return root + topic[len(CANONICAL) :]


def from_wire(topic: str, root: str) -> str:
    """A topic received under ``root`` as the canonical one (anything else unchanged: the
    ingest then refuses it as an unknown topic)."""
    if root == CANONICAL or not topic.startswith(root + "/"):
        return topic
    return CANONICAL + topic[len(root) :]


__all__ = ["CANONICAL", "DEFAULT_ROOT", "check_root", "from_wire", "to_wire"]
