"""``MqttCredentials``: how a client proves who it is to the broker and checks the broker.

A username/password (a device's is minted at enrolment, the coordinator's by the stack)
and the fleet CA that the broker's TLS certificate must chain to. Shared by the
coordinator, the edge agent and the local stack, so all three speak TLS the same way:
the server is verified against ``cafile`` only (plus its host name or IP), TLS 1.2 or
newer, and the secret never appears in a ``repr`` or a log line.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def tls_context(cafile: Path) -> ssl.SSLContext:
    """Verify the server against ``cafile`` only (and its host name or IP), TLS 1.2+.
    Raises ``OSError`` / ``ssl.SSLError`` when the CA file cannot be read."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class MqttCredentials:
    username: str
    password: str
    cafile: Path

    def __repr__(self) -> str:  # never print the secret
        return f"MqttCredentials(username={self.username!r}, cafile={str(self.cafile)!r})"

    def tls_context(self) -> ssl.SSLContext:
        return tls_context(self.cafile)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiomqtt.Client``."""
        return {
            "username": self.username,
            "password": self.password,
            "tls_context": self.tls_context(),
        }
