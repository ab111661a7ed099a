"""Model pull over the coordinator's REST API, with ETag cache and signature check.

Contract (``docs/wire.md``): ``GET /v1/models/{name}/latest`` → manifest JSON;
``/versions/{v}`` → the manifest of version ``v``; ``/versions/{v}/weights`` → float32 LE
bytes with ``ETag``, ``X-Fedfleet-Digest: sha256=…``
and ``X-Fedfleet-Signature``; ``latest.onnx`` likewise (signature over
``{name}:{version}:onnx:{digest}``); ``/v1/keys/model-signing`` → the Ed25519 public key.

Nothing is used before its sha256 digest and Ed25519 signature verify; a failure is a
``ModelVerifyError`` (refuse) or ``ModelFetchError`` (retry later).

Freshness: a ``latest`` answer (manifest or ONNX) carries the registry's publication,
signed (``schemas.signing.latest_message``). ``PublicationLog`` remembers per model the
highest one accepted (a file in the state dir: it survives restarts) and ``check_fresh``
refuses a lower one (``rollback``: an older version; ``stale_latest``): a replayed older
answer. An operator's rollback is a *new*, higher publication, so it is accepted. With a
pinned key (``public_key_hex``, or the hex in ``key_file``) a ``latest`` without a valid
publication signature is refused (``publication_unsigned`` / ``publication_signature``);
``require_pinned_key`` refuses to fetch the key from the server (``key_not_pinned``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import ModelFetchError, ModelGone, ModelRefused, ModelVerifyError
from schemas.artifact import digest_of
from schemas.atomic import atomic_write
from schemas.errors import SchemaError
from schemas.messages import ModelManifest
from schemas.modelspec import num_params
from schemas.signing import (
    PUBLICATION_HEADER,
    PUBLICATION_SIGNATURE_HEADER,
    latest_message,
    latest_onnx_message,
    onnx_message,
    weights_message,
)
from schemas.types import F32

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VerifiedModel:
    """A manifest and its verified (read-only) flat parameters; for an ``onnx`` job also
    its base artifact (the normalised ONNX graph, sha256 = ``manifest.spec.artifact``)."""

    manifest: ModelManifest
    params: F32
    artifact: bytes | None = None


@dataclass(frozen=True, slots=True)
class VerifiedOnnx:
    name: str
    version: int
    digest: str
    data: bytes


class Publication(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a verified ``latest`` answer stands: the registry's publication and the
    version it made ``latest``."""

    publication: int
    version: int


def check_fresh(seen: Publication | None, got: Publication) -> None:
    """Refuse a ``latest`` older than the newest accepted (``seen``). A higher publication
    is newer even with a lower version (an operator's rollback); an equal one must name
    the same version (the registry gives each publication one version)."""
    if seen is None or got.publication > seen.publication:
        return
    if got.publication == seen.publication:
        if got.version != seen.version:
            detail = f"publication {got.publication} is v{got.version}, was v{seen.version}"
            raise ModelVerifyError("publication_conflict", detail)
        return
    reason = "rollback" if got.version < seen.version else "stale_latest"
    raise ModelVerifyError(reason, f"latest is publication {got.publication} (v{got.version}); "
                           f"{seen.publication} (v{seen.version}) was accepted")  # fmt: skip


class PublicationLog:
    """The highest publication accepted per model name: a JSON file (``path``, kept across
    restarts; unreadable = empty, logged) or memory (``path=None``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._seen: dict[str, Publication] = {}
        if path is not None and path.exists():
            try:
                self._seen = msgspec.json.decode(path.read_bytes(), type=dict[str, Publication])
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)

    def get(self, name: str) -> Publication | None:
        return self._seen.get(name)

    def check(self, name: str, got: Publication) -> None:
        check_fresh(self._seen.get(name), got)

    def accept(self, name: str, got: Publication) -> None:
        """Remember ``got`` if it is newer (written to the file before returning)."""
        seen = self._seen.get(name)
        if seen is not None and got.publication <= seen.publication:
            return
        self._seen[name] = got
        if self.path is not None:
            try:
                atomic_write(self.path, msgspec.json.encode(self._seen))
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)


def load_public_key(hex_key: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as exc:
        raise ModelVerifyError("public_key", f"bad Ed25519 public key: {exc}") from None


def verify_signature(key: Ed25519PublicKey, signature_hex: str, message: str) -> None:
    """``message`` is built by ``schemas.signing``; its ASCII bytes are what was signed."""
    if not signature_hex:
        raise ModelVerifyError("unsigned", "model has no signature")
    try:
        key.verify(bytes.fromhex(signature_hex), message.encode("ascii"))
    except (InvalidSignature, ValueError):
        raise ModelVerifyError("signature", "Ed25519 signature does not verify") from None


def verify_publication(
    key: Ed25519PublicKey, resp: httpx.Response, name: str, version: int, digest: str, *,
    onnx: bool = False, required: bool = True,
) -> Publication | None:  # fmt: skip
    """The signed publication of a ``latest`` answer (``digest``: of the weights, or of
    the ONNX bytes when ``onnx``); None when the answer has none and none is ``required``."""
    raw = resp.headers.get(PUBLICATION_HEADER)
    if raw is None:
        if required:
            raise ModelVerifyError("publication_unsigned", "latest answer has no publication")
        return None
    try:
        publication = int(raw)
    except ValueError:
        raise ModelVerifyError("publication", f"bad {PUBLICATION_HEADER} header") from None
    if publication < 0:
        raise ModelVerifyError("publication", f"bad {PUBLICATION_HEADER} header")
    build = latest_onnx_message if onnx else latest_message
    sig = resp.headers.get(PUBLICATION_SIGNATURE_HEADER, "")
    try:
        verify_signature(key, sig, build(name, publication, version, digest))
    except ModelVerifyError as exc:
        raise ModelVerifyError(f"publication_{exc.reason}", exc.detail) from None
    return Publication(publication, version)


def _header_digest(resp: httpx.Response) -> str:
    raw = resp.headers.get("X-Fedfleet-Digest", "")
    return raw.split("=", 1)[1].strip().lower() if raw.startswith("sha256=") else ""


def decode_manifest(data: bytes) -> ModelManifest:
    try:
        return msgspec.json.decode(data, type=ModelManifest)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        reason = cause.reason if isinstance(cause, SchemaError) else "type"
        raise SchemaError(reason, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise SchemaError("malformed", str(exc)) from None


def verify_weights(manifest: ModelManifest, data: bytes, key: Ed25519PublicKey, sig: str) -> F32:
    """Check size, digest and signature of raw weights; return them as a read-only array."""
    n = num_params(manifest.spec)
    if len(data) != 4 * n:
        raise ModelVerifyError("size", f"{len(data)} bytes, model needs {4 * n}")
    if manifest.shard_bounds[-1] != n or len(manifest.shard_versions) != (
        len(manifest.shard_bounds) - 1
    ):
        raise ModelVerifyError("shape", "manifest shard layout does not match the model")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.digest.lower():
        raise ModelVerifyError("digest", f"sha256 {digest} != manifest {manifest.digest}")
    verify_signature(key, sig, weights_message(manifest.model_name, manifest.version, digest))
    params = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(params)):
        raise ModelVerifyError("non_finite", "model contains NaN/Inf")
    params.setflags(write=False)
    return params


class ModelClient:
    """Pulls and verifies models; caches weights by digest (on disk or in memory)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        *,
        cache_dir: Path | None = None,
        public_key_hex: str = "",
        max_bytes: int = 256 << 20,
        key_file: Path | None = None,
        require_pinned_key: bool = False,
        publications: PublicationLog | None = None,
    ) -> None:
        self._http = http
        self._api = api_url.rstrip("/")
        self._dir = cache_dir
        self._key = load_public_key(public_key_hex) if public_key_hex else None
        self._pinned = self._key is not None  # False: the key was fetched from the server
        self._key_file = key_file
        self._require_pinned = require_pinned_key
        self.publications = publications if publications is not None else PublicationLog()
        self._max = max_bytes
        self._mem: dict[str, bytes] = {}  # digest -> bytes (memory mode; last 2 kept)
        self._onnx: VerifiedOnnx | None = None
        self._artifacts: dict[str, bytes] = {}  # digest -> an onnx job's base artifact
        self.cache_hits = 0
        self.downloads = 0
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    async def _get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            resp = await self._http.get(self._api + path, headers=headers)
        except httpx.HTTPError as exc:
            raise ModelFetchError("network", f"GET {path}: {exc!r}") from None
        if resp.status_code == 304:
            return resp
        if resp.status_code >= 500 or resp.status_code == 429:
            raise ModelFetchError("server", f"GET {path}: HTTP {resp.status_code}")
        if resp.status_code == 404:  # not published yet (or that version is gone)
            raise ModelGone("http", f"GET {path}: HTTP 404")
        if resp.status_code == 408:  # timeout: try again later
            raise ModelFetchError("http", f"GET {path}: HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise ModelRefused("http", f"GET {path}: HTTP {resp.status_code}")
        if len(resp.content) > self._max:
            raise ModelVerifyError("too_large", f"GET {path}: {len(resp.content)} bytes")
        return resp

    def _key_from_file(self) -> Ed25519PublicKey | None:
        path = self._key_file
        if path is None or not path.exists():
            return None
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, ValueError) as exc:
            raise ModelVerifyError("public_key", f"cannot read {path}: {exc}") from None
        return load_public_key(text)

    async def public_key(self) -> Ed25519PublicKey:
        """The pinned key (``public_key_hex``, else the hex in ``key_file`` once it exists),
        or, unless ``require_pinned_key``, the coordinator's key fetched once (trust on
        first use: ``key_not_pinned`` when refused)."""
        if self._key is None:
            self._key = self._key_from_file()
            self._pinned = self._key is not None
        if self._key is None:
            if self._require_pinned:
                detail = "no pinned model-signing key; require_pinned_key: not fetching one"
                raise ModelVerifyError("key_not_pinned", detail)
            resp = await self._get("/v1/keys/model-signing")
            try:
                body = resp.json()
                if body.get("alg") != "ed25519":
                    raise ModelVerifyError("public_key", f"unsupported alg {body.get('alg')}")
                self._key = load_public_key(str(body["public_key"]))
            except (ValueError, KeyError, AttributeError, TypeError):
                raise ModelVerifyError("public_key", "malformed key response") from None
            log.warning("using model-signing key fetched from %s (not pinned)", self._api)
        return self._key

    def _fresh(self, key: Ed25519PublicKey, resp: httpx.Response, name: str, version: int,
               digest: str, *, onnx: bool = False) -> Publication | None:  # fmt: skip
        """The verified publication of a ``latest`` answer, refused if older than one
        accepted (required with a pinned key; an unpinned key accepts an answer without)."""
        got = verify_publication(key, resp, name, version, digest, onnx=onnx,
                                 required=self._pinned)  # fmt: skip
        if got is not None:
            self.publications.check(name, got)
        return got

    async def latest_manifest(self, name: str) -> ModelManifest:
        """The latest manifest; its publication verified, no older than one accepted,
        and remembered."""
        key = await self.public_key()
        resp, manifest = await self._manifest(name, f"/v1/models/{name}/latest")
        got = self._fresh(key, resp, name, manifest.version, manifest.digest)
        if got is not None:
            self.publications.accept(name, got)
        return manifest

    async def version_manifest(self, name: str, version: int) -> ModelManifest:
        """The manifest of published ``version`` (``ModelGone`` when the server has not
        got it, or no longer)."""
        _, manifest = await self._manifest(name, f"/v1/models/{name}/versions/{version}")
        if manifest.version != version:
            raise ModelVerifyError("manifest", f"asked for v{version}, got v{manifest.version}")
        return manifest

    async def _manifest(self, name: str, path: str) -> tuple[httpx.Response, ModelManifest]:
        resp = await self._get(path)
        try:
            manifest = decode_manifest(resp.content)
        except SchemaError as exc:
            raise ModelVerifyError("manifest", str(exc)) from None
        if manifest.model_name != name:
            raise ModelVerifyError("manifest", f"asked for {name}, got {manifest.model_name}")
        return resp, manifest

    # ----------------------------------------------------------------- weights cache

    def _cached(self, digest: str) -> bytes | None:
        if self._dir is None:
            return self._mem.get(digest)
        try:
            return (self._dir / f"{digest}.bin").read_bytes()
        except OSError:
            return None

    def _store(self, digest: str, data: bytes) -> None:
        if self._dir is None:
            self._mem = {k: v for k, v in list(self._mem.items())[-1:]}
            self._mem[digest] = data
            return
        for old in self._dir.glob("*.bin"):
            if old.stem != digest:
                old.unlink(missing_ok=True)  # keep only the newest model on the device
        atomic_write(self._dir / f"{digest}.bin", data)

    def _drop(self, digest: str) -> None:
        self._mem.pop(digest, None)
        if self._dir is not None:
            (self._dir / f"{digest}.bin").unlink(missing_ok=True)

    async def weights(self, manifest: ModelManifest, *, keep: bool = True) -> F32:
        """Verified weights of ``manifest`` (cached by digest). ``keep=False`` reads the cache
        but does not replace it (an older version scored once must not evict the model the
        device trains on)."""
        key = await self.public_key()
        digest = manifest.digest.lower()
        path = f"/v1/models/{manifest.model_name}/versions/{manifest.version}/weights"
        cached = self._cached(digest)
        headers = {"If-None-Match": f'"{digest}"'} if cached is not None else None
        resp = await self._get(path, headers)
        sig = resp.headers.get("X-Fedfleet-Signature", "") or manifest.signature
        if resp.status_code == 304 and cached is not None:
            try:
                params = verify_weights(manifest, cached, key, sig)
                self.cache_hits += 1
                return params
            except ModelVerifyError:
                self._drop(digest)  # cache corrupted on disk: download afresh
                resp = await self._get(path)
                sig = resp.headers.get("X-Fedfleet-Signature", "") or manifest.signature
        elif resp.status_code == 304:
            resp = await self._get(path)
        hdr = _header_digest(resp)
        if hdr and hdr != digest:
            raise ModelVerifyError("digest", f"header digest {hdr} != manifest {digest}")
        params = verify_weights(manifest, resp.content, key, sig)
        self.downloads += 1
        if keep:
            self._store(digest, resp.content)
        return params

    async def artifact(self, digest: str) -> bytes:
        """An onnx job's base artifact (``GET /v1/artifacts/{digest}``), used only once its
        sha256 is ``digest`` (the one the manifest's spec names; the manifest itself is not
        signed, only the weights: see docs/models.md); cached by digest (immutable), on disk
        next to the weights or in memory."""
        name = f"artifact-{digest.removeprefix('sha256:')}.onnx"
        hit = self._artifacts.get(digest)
        if hit is None and self._dir is not None:
            try:
                hit = (self._dir / name).read_bytes()
            except OSError:
                hit = None
        if hit is not None and digest_of(hit) == digest:
            self._artifacts = {digest: hit}
            return hit
        resp = await self._get(f"/v1/artifacts/{digest}")
        got = digest_of(resp.content)
        if got != digest:
            raise ModelVerifyError("digest", f"artifact sha256 {got} != {digest}")
        if self._dir is not None:
            for old in self._dir.glob("artifact-*.onnx"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            atomic_write(self._dir / name, resp.content)
        self._artifacts = {digest: resp.content}
        return resp.content

    async def _with_artifact(self, manifest: ModelManifest, params: F32) -> VerifiedModel:
        spec = manifest.spec
        art = await self.artifact(spec.artifact) if spec.family == "onnx" else None
        return VerifiedModel(manifest, params, art)

    async def pull(self, name: str) -> VerifiedModel:
        manifest = await self.latest_manifest(name)
        return await self._with_artifact(manifest, await self.weights(manifest))

    async def pull_version(self, name: str, version: int) -> VerifiedModel:
        """Published ``version`` of ``name``, verified like ``pull``; the latest when
        ``version`` is -1 or the server no longer has it (404): the manifest says which
        version it is. A version other than the latest is not written to the weights cache."""
        if version >= 0:
            try:
                manifest = await self.version_manifest(name, version)
                params = await self.weights(manifest, keep=False)
                return await self._with_artifact(manifest, params)
            except ModelGone:
                log.info("model %s v%d is gone; scoring the latest", name, version)
        return await self.pull(name)

    # ----------------------------------------------------------------- ONNX

    async def onnx(self, name: str, version_hint: int) -> VerifiedOnnx:
        """Latest verified ONNX artifact; the cached one when the server answers 304.

        The signed version comes from ``X-Fedfleet-Version`` when the server sends it, else
        ``version_hint`` (the manifest version just pulled).
        """
        key = await self.public_key()
        cur = self._onnx if self._onnx is not None and self._onnx.name == name else None
        headers = {"If-None-Match": f'"{cur.digest}"'} if cur is not None else None
        resp = await self._get(f"/v1/models/{name}/latest.onnx", headers)
        if resp.status_code == 304 and cur is not None:
            return cur
        if resp.status_code == 304:
            resp = await self._get(f"/v1/models/{name}/latest.onnx")
        digest = hashlib.sha256(resp.content).hexdigest()
        hdr = _header_digest(resp)
        if hdr != digest:
            raise ModelVerifyError("digest", f"onnx sha256 {digest} != header {hdr or '-'}")
        try:
            version = int(resp.headers.get("X-Fedfleet-Version", version_hint))
        except ValueError:
            raise ModelVerifyError("version", "bad X-Fedfleet-Version header") from None
        sig = resp.headers.get("X-Fedfleet-Signature", "")
        verify_signature(key, sig, onnx_message(name, version, digest))
        got = self._fresh(key, resp, name, version, digest, onnx=True)
        art = VerifiedOnnx(name, version, digest, resp.content)
        if got is not None:
            self.publications.accept(name, got)
        self._onnx = art
        if self._dir is not None:
            atomic_write(self._dir / f"{name}.onnx", resp.content)
        return art
