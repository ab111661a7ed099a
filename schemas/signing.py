"""The messages a model signature covers: what the coordinator signs and a device verifies.

A weights download is signed over ``{name}:{version}:{digest}`` and an ONNX artifact over
``{name}:{version}:onnx:{digest}`` (``digest`` = lowercase hex sha256 of the bytes
served). Both ends build the text with these functions and sign/verify its ASCII bytes
with Ed25519 (``coordinator.signing.Signer``, ``edge_agent.models``).

A ``latest`` answer also carries the registry's *publication* of that model (a number
that grows at every change of what ``latest`` is: new version, pin, rollback, unpin) in
``X-Fedfleet-Publication``, signed in ``X-Fedfleet-Publication-Signature`` over
``latest/{name}:{publication}:{version}:{digest}`` (weights digest; the JSON manifest) or
``latest/{name}:{publication}:{version}:onnx:{digest}`` (``latest.onnx``). The
``latest/`` prefix cannot start a model name (no ``/`` in an id), so no weights or ONNX
signature ever verifies as a pointer signature; parsed from the right each message is
unambiguous although names may contain ``:``.
"""

from __future__ import annotations

PUBLICATION_HEADER = "X-Fedfleet-Publication"
PUBLICATION_SIGNATURE_HEADER = "X-Fedfleet-Publication-Signature"


def weights_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:{digest}"


def onnx_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:onnx:{digest}"


def latest_message(name: str, publication: int, version: int, digest: str) -> str:
    """What a ``latest`` manifest's publication signature covers (``digest``: weights)."""
    return f"latest/{name}:{publication}:{version}:{digest}"


def latest_onnx_message(name: str, publication: int, version: int, digest: str) -> str:
    """What a ``latest.onnx`` answer's publication signature covers (``digest``: ONNX)."""
    return f"latest/{name}:{publication}:{version}:onnx:{digest}"
