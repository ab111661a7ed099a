"""``KafkaAuth``: how a service proves who it is to Kafka and checks the brokers.

The secure stack's brokers listen ``SASL_SSL`` only: TLS verified against the fleet CA
(the same trust anchor as the MQTT broker and the REST API) and a SCRAM-SHA-512 login,
one user per service (``coordinator``, ``aggregator``, ``fedfleet-admin`` for tools and
tests). SCRAM rather than PLAIN: the brokers keep only salted hashes (KRaft stores them
in the cluster metadata, written at ``kafka-storage format --add-scram``), and the
password never crosses the connection even inside TLS. Shared by the coordinator, the
aggregator and the local stack, so all three connect the same way; the secret never
appears in a ``repr`` or a log line.

A service is given ``kafka_username``, ``kafka_password_file`` (owner-only, like every
secret file here) and ``kafka_cafile``; without a username it connects in plain text, as
the insecure stack and a plain Kafka expect.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import SettingsError
from schemas.mqtt_auth import tls_context
from schemas.settings import check

MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
DEFAULT_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class KafkaAuth:
    username: str
    password: str
    cafile: Path
    mechanism: str = DEFAULT_MECHANISM

    def __repr__(self) -> str:  # never print the secret
        return (f"KafkaAuth(username={self.username!r}, mechanism={self.mechanism!r}, "
                f"cafile={str(self.cafile)!r})")  # fmt: skip

    def tls_context(self) -> ssl.SSLContext:
        return tls_context(self.cafile)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer, admin client and client."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_context": self.tls_context(),
        }


def read_secret(path: Path, field: str) -> str:
    """The secret in ``path``: a ``SettingsError`` naming ``field`` when the file is
    missing, empty, or readable by group or others."""
    try:
        mode = path.stat().st_mode
        secret = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(field, f"cannot read {path}: {exc.strerror or exc}") from None
    check(not mode & 0o077, field, f"{path} is readable by group or others (chmod 600 it)")
    check(bool(secret), field, f"{path} is empty")
    return secret


def check_kafka_auth(username: str, password_file: Path | None, cafile: Path | None,
                     mechanism: str) -> None:  # fmt: skip
    """The ``__post_init__`` rules of the three ``kafka_*`` settings."""
    check(bool(username) == (password_file is not None), "kafka_password_file",
          "kafka_username and kafka_password_file go together")  # fmt: skip
    check(not username or cafile is not None, "kafka_cafile",
          "a Kafka password is only sent over TLS: set kafka_cafile")  # fmt: skip
    check(mechanism in MECHANISMS, "kafka_sasl_mechanism",
          f"{mechanism!r} is not one of {', '.join(MECHANISMS)}")  # fmt: skip


def kafka_auth(username: str, password_file: Path | None, cafile: Path | None,
               mechanism: str = DEFAULT_MECHANISM) -> KafkaAuth | None:  # fmt: skip
    """The service's Kafka login (None: plain text, no login); the password is read here."""
    if not username or password_file is None:
        return None
    assert cafile is not None
    return KafkaAuth(username, read_secret(password_file, "kafka_password_file"), cafile,
                     mechanism)  # fmt: skip


def client_kwargs(auth: KafkaAuth | None) -> dict[str, Any]:
    """aiokafka keyword arguments for ``auth`` ({} for plain text)."""
    return auth.client_kwargs() if auth is not None else {}


KafkaTarget = str | dict[str, Any]  # a bootstrap string, or a service's kafka_kwargs()


def as_kwargs(kafka: KafkaTarget) -> dict[str, Any]:
    """aiokafka keyword arguments for ``kafka``: a plain bootstrap string (no login) or
    the ``kafka_kwargs()`` of a service's settings (bootstrap and login)."""
    return {"bootstrap_servers": kafka} if isinstance(kafka, str) else dict(kafka)
