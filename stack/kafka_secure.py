"""The secure stack's Kafka: every listener SASL_SSL, one SCRAM user per service.

``KafkaSecurity.prepare(workdir, ca_dir)`` writes, under ``workdir`` (the Kafka node
directories' parent):

- ``tls/`` (0700): ``server.pem`` (0644) and ``server.key`` (0600), the brokers'
  certificate from the fleet CA in ``ca_dir`` (the MQTT broker's) for 127.0.0.1 and
  localhost, and ``keystore.pem`` (0600), key + certificate in one file: Kafka's ``PEM``
  keystore;
- ``secrets/`` (0700): ``<user>.secret`` (0600), the password of each of ``USERS``, kept
  across restarts.

The client listener (``CLIENT``, also the inter-broker one) takes SCRAM-SHA-512 logins;
the users and their salted hashes are written into the cluster metadata when the storage
is formatted (``--add-scram``, KIP-900; only the hash appears in the format command's
arguments). The controller listener takes PLAIN for the ``broker`` user alone, over TLS
(KRaft controllers cannot check SCRAM: the credentials live in the metadata they serve).
Both need TLS, so no listener speaks plain text: an ``AdminClient`` that bootstraps from
the controllers (KIP-919) must log in too. Passwords sit in the node's
``server.properties`` (the JAAS lines), which is written 0600.

What is not here: Kafka ACLs (``StandardAuthorizer``): every authenticated service user
may read and write every topic; the login keeps out whoever has no credential.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from schemas.kafka_auth import KafkaAuth
from stack.pki import LOCAL_HOSTS, ensure_tls, private_dir, write_private

# service users (coordinator, aggregator), tools and tests (fedfleet-admin), the brokers
USERS = ("coordinator", "aggregator", "fedfleet-admin", "broker")
MECHANISM = "SCRAM-SHA-512"
ITERATIONS = 4096  # Kafka's default; the passwords are 256 random bits


def scram_arg(user: str, password: str, salt: bytes) -> str:
    """``kafka-storage format --add-scram`` value with the salted password, not the
    password: SaltedPassword = PBKDF2-HMAC-SHA512(password, salt, ITERATIONS) (RFC 5802
    ``Hi``), both base64."""
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    b64 = base64.b64encode
    return (f'{MECHANISM}=[name={user},salt="{b64(salt).decode()}",'
            f'saltedpassword="{b64(salted).decode()}",iterations={ITERATIONS}]')  # fmt: skip


def _jaas(module: str, user: str, password: str, extra: str = "") -> str:
    return f'{module} required username="{user}" password="{password}"{extra};'


@dataclass(frozen=True)
class KafkaSecurity:
    secrets_dir: Path
    cafile: Path
    keystore: Path
    passwords: dict[str, str]

    @classmethod
    def prepare(cls, workdir: Path, ca_dir: Path) -> KafkaSecurity:
        tls = ensure_tls(workdir / "tls", LOCAL_HOSTS, ca_dir=ca_dir)
        keystore = write_private(
            workdir / "tls" / "keystore.pem",
            tls.server_key.read_bytes() + tls.server_cert.read_bytes(),
        )
        sdir = private_dir(workdir / "secrets")
        passwords: dict[str, str] = {}
        for user in USERS:
            f = sdir / f"{user}.secret"
            if f.exists():
                passwords[user] = f.read_text().strip()
            else:
                passwords[user] = secrets.token_urlsafe(32)
                write_private(f, passwords[user].encode())
        return cls(secrets_dir=sdir, cafile=tls.ca_cert, keystore=keystore, passwords=passwords)

    def password_file(self, user: str) -> Path:
        return self.secrets_dir / f"{user}.secret"

    def auth(self, user: str) -> KafkaAuth:
        return KafkaAuth(user, self.passwords[user], self.cafile, MECHANISM)

    def format_args(self) -> list[str]:
        """``--add-scram`` arguments for every user (fresh salts)."""
        out: list[str] = []
        for user, pw in self.passwords.items():
            out += ["--add-scram", scram_arg(user, pw, os.urandom(16))]
        return out

    def props(self, port: int, cport: int) -> list[str]:
        """The listener lines of one node (client ``port``, controller ``cport``)."""
        pw = self.passwords["broker"]
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return [
            f"listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=CLIENT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=CLIENT",
            "listener.security.protocol.map=CLIENT:SASL_SSL,CONTROLLER:SASL_SSL",
            f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
            "sasl.mechanism.controller.protocol=PLAIN",
            f"listener.name.client.sasl.enabled.mechanisms={MECHANISM}",
            f"listener.name.client.{MECHANISM.lower()}.sasl.jaas.config="
            + _jaas(scram, "broker", pw),
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "listener.name.controller.plain.sasl.jaas.config="
            + _jaas(plain, "broker", pw, f' user_broker="{pw}"'),
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.cafile}",
            "ssl.client.auth=none",
            "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
        ]


__all__ = ["ITERATIONS", "MECHANISM", "USERS", "KafkaSecurity", "scram_arg"]
