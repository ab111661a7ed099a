"""Ed25519 model signing: key generated on first run, stored as raw 32-byte private key."""

from __future__ import annotations

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

from coordinator.errors import CoordinatorError
from schemas.atomic import atomic_write


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_hex = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """The key in ``path`` (32 raw bytes), created (mode 0600) when the file is absent;
        an unreadable, unwritable or corrupt key file is a ``CoordinatorError`` that says so."""
        path = Path(path)
        try:
            if path.exists():
                raw = path.read_bytes()
                if len(raw) != 32:
                    raise ValueError(f"{len(raw)} bytes, an Ed25519 private key has 32")
                return cls(Ed25519PrivateKey.from_private_bytes(raw))
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            atomic_write(path, raw, mode=0o600)
            return cls(key)
        except (OSError, ValueError) as exc:
            raise CoordinatorError("signing_key", f"cannot use {path}: {exc}") from None

    def sign(self, message: str) -> str:
        return self._key.sign(message.encode("ascii")).hex()


def verify(public_hex: str, message: str, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature_hex), message.encode("ascii")
        )
    except Exception:
        return False
    return True
