"""In-package fakes for tests and simulations (the httpx way: a mock transport you can ship).

``FakeModelServer`` serves the coordinator's model REST endpoints (``docs/wire.md``: latest,
versioned manifests and weights, ONNX, the signing key) from memory through
``httpx.MockTransport``, signs with a fresh Ed25519 key, and can be told to tamper with
what it serves or to forget a version (``drop_version``). ONNX artifacts come from the
coordinator's own exporter. ``latest`` answers carry a signed publication that grows at
every ``publish``/``rollback``/``unpin``, as the registry's do.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas.messages import ModelManifest, ModelSpecMsg
from schemas.modelspec import num_params
from schemas.onnx_export import export
from schemas.signing import (
    PUBLICATION_HEADER,
    PUBLICATION_SIGNATURE_HEADER,
    latest_message,
    latest_onnx_message,
    onnx_message,
    weights_message,
)
from schemas.types import F32


@dataclass
class _Published:
    manifest: ModelManifest
    weights: bytes
    onnx: bytes
    onnx_sig: str


@dataclass
class FakeModelServer:
    """Model REST endpoints in memory. ``tamper_weights``/``tamper_onnx`` flip a byte after
    signing; ``bad_signature`` serves a signature by another key; ``fail_status`` answers
    every model request with that HTTP status."""

    base_url: str = "http://coordinator.test"
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    tamper_weights: bool = False
    tamper_onnx: bool = False
    bad_signature: bool = False
    fail_status: int = 0
    with_onnx: bool = True
    requests: list[str] = field(default_factory=list)
    not_modified: int = 0
    gone: set[tuple[str, int]] = field(default_factory=set)  # (name, version) answered 404
    _models: dict[str, list[_Published]] = field(default_factory=dict)
    publications: dict[str, int] = field(default_factory=dict)  # name -> current publication
    pins: dict[str, int] = field(default_factory=dict)  # name -> version served as latest

    @property
    def public_key_hex(self) -> str:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def publish(
        self,
        name: str,
        spec: ModelSpecMsg,
        params: F32,
        *,
        job_id: str = "job-1",
        shard_bounds: list[int] | None = None,
    ) -> ModelManifest:
        versions = self._models.setdefault(name, [])
        version = len(versions)
        n = num_params(spec)
        bounds = shard_bounds or [0, n]
        data = np.asarray(params, dtype="<f4").tobytes()
        digest = hashlib.sha256(data).hexdigest()
        sig = self.key.sign(weights_message(name, version, digest).encode("ascii")).hex()
        manifest = ModelManifest(
            model_name=name,
            job_id=job_id,
            version=version,
            shard_versions=[version] * (len(bounds) - 1),
            shard_bounds=bounds,
            spec=spec,
            digest=digest,
            signature=sig,
            created_ts=time.time(),
        )
        onnx_bytes = export(spec, params) if self.with_onnx else b""
        odig = hashlib.sha256(onnx_bytes).hexdigest()
        osig = self.key.sign(onnx_message(name, version, odig).encode("ascii")).hex()
        versions.append(_Published(manifest, data, onnx_bytes, osig))
        self.publications[name] = self.publications.get(name, 0) + 1
        return manifest

    def rollback(self, name: str, version: int) -> None:
        """Serve ``version`` as ``latest`` (a new publication), as ``POST .../rollback``."""
        self.pins[name] = version
        self.publications[name] += 1

    def unpin(self, name: str) -> None:
        self.pins.pop(name, None)
        self.publications[name] += 1

    def _publication(self, name: str, version: int, digest: str, onnx: bool) -> dict[str, str]:
        pub = self.publications[name]
        msg = (latest_onnx_message if onnx else latest_message)(name, pub, version, digest)
        sig = self.key.sign(msg.encode("ascii")).hex()
        return {PUBLICATION_HEADER: str(pub), PUBLICATION_SIGNATURE_HEADER: sig}

    def drop_version(self, name: str, version: int) -> None:
        """The registry no longer has ``version``: its manifest and weights answer 404."""
        self.gone.add((name, version))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), base_url=self.base_url)

    def _sig(self, real: str, message: str) -> str:
        if self.bad_signature:
            return Ed25519PrivateKey.generate().sign(message.encode("ascii")).hex()
        return real

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(path)
        parts = path.strip("/").split("/")
        if path == "/v1/keys/model-signing":
            return httpx.Response(200, json={"alg": "ed25519", "public_key": self.public_key_hex})
        if len(parts) < 4 or parts[:2] != ["v1", "models"] or parts[2] not in self._models:
            return httpx.Response(404, json={"detail": "not found"})
        if self.fail_status:
            return httpx.Response(self.fail_status)
        versions = self._models[parts[2]]
        latest = versions[self.pins.get(parts[2], -1)]
        if parts[3] == "latest":
            m = latest.manifest
            headers = self._publication(m.model_name, m.version, m.digest, False)
            return httpx.Response(200, content=msgspec.json.encode(m), headers=headers)
        if parts[3] == "latest.onnx":
            if not self.with_onnx:
                return httpx.Response(404)
            return self._artifact(request, latest.onnx, latest.onnx_sig, latest, onnx=True)
        if parts[3] == "versions" and len(parts) >= 5 and parts[4].isdigit():
            v = int(parts[4])
            if v >= len(versions) or (parts[2], v) in self.gone:
                return httpx.Response(404)
            pub = versions[v]
            if len(parts) == 5:
                return httpx.Response(200, content=msgspec.json.encode(pub.manifest))
            if parts[5] == "weights":
                return self._artifact(request, pub.weights, pub.manifest.signature, pub)
        return httpx.Response(404, content=json.dumps({"detail": "no route"}).encode())

    def _artifact(
        self, request: httpx.Request, data: bytes, sig: str, pub: _Published, *, onnx: bool = False
    ) -> httpx.Response:
        digest = hashlib.sha256(data).hexdigest()
        etag = f'"{digest}"'
        m = pub.manifest
        msg = (onnx_message if onnx else weights_message)(m.model_name, m.version, digest)
        headers = {
            "ETag": etag,
            "X-Fedfleet-Digest": f"sha256={digest}",
            "X-Fedfleet-Signature": self._sig(sig, msg),
            "X-Fedfleet-Version": str(m.version),
        }
        if onnx:  # the only ONNX route is latest.onnx
            headers.update(self._publication(m.model_name, m.version, digest, True))
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return httpx.Response(304, headers=headers)
        if (self.tamper_onnx and onnx) or (self.tamper_weights and not onnx):
            body = bytearray(data)
            body[len(body) // 2] ^= 0x01
            data = bytes(body)
        return httpx.Response(200, content=data, headers=headers)


def asgi_app(server: FakeModelServer) -> Any:
    """Serve a ``FakeModelServer`` over real HTTP (e.g. with uvicorn) for subprocess tests."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        req = httpx.Request(scope["method"], server.base_url + scope["path"], headers=headers)
        resp = server.handle(req)
        await send(
            {
                "type": "http.response.start",
                "status": resp.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in resp.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": resp.content})

    return app
