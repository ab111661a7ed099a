"""Ed25519 model signing: key generated on first run, stored as raw 32-byte private key."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_hex = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        path = Path(path)
        if path.exists():
            raw = path.read_bytes()
            return cls(Ed25519PrivateKey.from_private_bytes(raw[:32]))
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
        return cls(key)

    def sign(self, message: str) -> str:
        return self._key.sign(message.encode("ascii")).hex()


def weights_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:{digest}"


def onnx_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:onnx:{digest}"


def verify(public_hex: str, message: str, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature_hex), message.encode("ascii")
        )
    except Exception:
        return False
    return True
