"""The messages a model signature covers: what the coordinator signs and a device verifies.

A weights download is signed over ``{name}:{version}:{digest}`` and an ONNX artifact over
``{name}:{version}:onnx:{digest}`` (``digest`` = lowercase hex sha256 of the bytes
served). Both ends build the text with these functions and sign/verify its ASCII bytes
with Ed25519 (``coordinator.signing.Signer``, ``edge_agent.models``).
"""

from __future__ import annotations


def weights_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:{digest}"


def onnx_message(name: str, version: int, digest: str) -> str:
    return f"{name}:{version}:onnx:{digest}"
