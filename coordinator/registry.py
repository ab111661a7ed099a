"""Model registry: assemble shard slices into signed, content-addressed global versions.

Disk layout under ``model_store_dir``::

    blobs/{sha256}.f32              float32 little-endian weights (content-addressed)
    artifacts/{sha256}.onnx         onnx jobs' base artifacts (``coordinator.artifacts``)
    onnx/{weights_sha256}.{spec}.onnx   ONNX artifact, built lazily and cached per weights
                                    digest and spec (``spec_tag``: a standardize job's
                                    input mean/std are part of the graph, not the weights)
    models/{name}/v{version:010d}.json   ModelManifest (JSON)
    models/{name}/pin               pinned version (rollback); absent = newest is latest
    models/{name}/publication       ``Pointer`` (JSON): the version ``latest`` is and the
                                    publication that made it so (``next_publication``)
    models/{name}/.lock             ``flock``ed while the pin or the pointer changes

``assemble`` is the pure step (newest slice per shard wins); ``ModelRegistry`` is the
file-system shell around it. Several coordinator processes may serve the same directory;
only the one owning ``fl.models`` writes versions, any may pin/unpin (REST), and every
change of what ``latest`` is (new version, pin, rollback, unpin) takes a new, larger
publication under the model's lock, which ``latest`` answers carry signed
(``schemas.signing.latest_message``) so devices can refuse a replayed older answer.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import zstandard

from coordinator.artifacts import ArtifactStore, artifact_bytes
from coordinator.errors import NotFound, RegistryError
from coordinator.signing import Signer
from schemas.artifact import export_version, initial_params
from schemas.atomic import atomic_write, check_writable_dir
from schemas.messages import JobSpec, ModelManifest, ModelSpecMsg, ShardVersion
from schemas.modelspec import num_params
from schemas.signing import latest_message, latest_onnx_message, onnx_message, weights_message
from schemas.types import F32

BLOB_CACHE_ENTRIES = 4
BLOB_CACHE_MAX_BYTES = 64 << 20
DISK_RECHECK_S = 0.5  # how stale another coordinator's newer shard versions may be seen


@dataclass(slots=True)
class JobSlices:
    """The newest slice of every shard of one job, as one flat vector."""

    flat: F32
    shard_versions: list[int]


class Pointer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``latest`` of a model is (``version``) since ``publication``."""

    publication: int
    version: int


@dataclass(frozen=True, slots=True)
class Latest:
    """A model's ``latest`` with its publication and the signature of the pointer
    (``latest_message`` over the weights digest)."""

    publication: int
    manifest: ModelManifest
    signature: str


def next_publication(prev: int | None, now_ms: int) -> int:
    """The publication after ``prev``: the wall clock in ms, or ``prev + 1`` when that is
    not larger. It only grows, and a store whose pointer was lost (or a model re-created)
    still starts above what devices remember, unless the clock went back."""
    return now_ms if prev is None else max(prev + 1, now_ms)


def spec_tag(spec: ModelSpecMsg) -> str:
    """Short digest of a model spec: names the ONNX artifact with the weights digest."""
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:16]


def decode_params(sv: ShardVersion, max_bytes: int) -> F32:
    n = sv.stop - sv.start
    try:
        raw = zstandard.ZstdDecompressor().decompress(sv.params, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise RegistryError("codec", f"bad zstd params: {exc}") from None
    if len(raw) != 4 * n:
        raise RegistryError("shape", f"expected {4 * n} bytes of params, got {len(raw)}")
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise RegistryError("non_finite", "params contain NaN/Inf")
    return arr


def assemble(state: JobSlices, bounds: list[int], sv: ShardVersion, params: F32) -> bool:
    """Fold a shard's new slice into ``state``; False if it is not newer (ignored)."""
    s = sv.shard
    if s >= len(bounds) - 1:
        raise RegistryError("shape", f"shard {s} out of range ({len(bounds) - 1} shards)")
    if (sv.start, sv.stop) != (bounds[s], bounds[s + 1]):
        raise RegistryError(
            "shape", f"shard {s} bounds [{sv.start},{sv.stop}) != [{bounds[s]},{bounds[s + 1]})"
        )
    if params.shape != (sv.stop - sv.start,):
        raise RegistryError("shape", "slice length does not match bounds")
    if sv.version <= state.shard_versions[s]:
        return False
    state.flat[sv.start : sv.stop] = params
    state.shard_versions[s] = sv.version
    return True


class ModelRegistry:
    def __init__(self, store_dir: Path, signer: Signer, *, retention: int = 20,
                 artifacts: ArtifactStore | None = None) -> None:  # fmt: skip
        self.dir = Path(store_dir)
        self.signer = signer
        self.artifacts = artifacts  # onnx jobs' base artifacts (their local cache)
        self.retention = max(1, retention)
        self._jobs: dict[str, JobSlices] = {}
        self._manifests: dict[tuple[str, int], ModelManifest] = {}
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}
        self._on_disk: dict[str, tuple[float, list[int]]] = {}
        self._pointer_sigs: dict[str, str] = {}  # latest message -> signature (memo)
        try:
            for sub in ("blobs", "onnx", "models"):
                check_writable_dir(self.dir / sub)
        except OSError as exc:
            raise RegistryError("model_store", f"cannot use {self.dir}: {exc}") from None

    # ------------------------------------------------------------------ reading
    def _mdir(self, name: str) -> Path:
        return self.dir / "models" / name

    def versions(self, name: str) -> list[int]:
        d = self._mdir(name)
        if not d.is_dir():
            return []
        out = []
        for e in os.scandir(d):
            if e.name.startswith("v") and e.name.endswith(".json"):
                try:
                    out.append(int(e.name[1:-5]))
                except ValueError:
                    continue
        return sorted(out)

    def models(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.dir / "models") if e.is_dir())

    def manifest(self, name: str, version: int) -> ModelManifest:
        m = self._manifests.get((name, version))
        if m is not None:
            return m
        path = self._mdir(name) / f"v{version:010d}.json"
        try:
            m = msgspec.json.decode(path.read_bytes(), type=ModelManifest)
        except FileNotFoundError:
            raise NotFound("version", f"{name} v{version}") from None
        self._manifests[(name, version)] = m
        return m

    def pinned(self, name: str) -> int | None:
        try:
            return int((self._mdir(name) / "pin").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def latest(self, name: str) -> ModelManifest:
        pin = self.pinned(name)
        if pin is not None:
            return self.manifest(name, pin)
        vs = self.versions(name)
        if not vs:
            raise NotFound("model", name)
        return self.manifest(name, vs[-1])

    # ------------------------------------------------------------------ the latest pointer
    def _pointer(self, name: str) -> Pointer | None:
        try:
            return msgspec.json.decode((self._mdir(name) / "publication").read_bytes(),
                                       type=Pointer)  # fmt: skip
        except (FileNotFoundError, msgspec.DecodeError):  # corrupt: a new one is written
            return None

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Exclusive across threads and the processes sharing the store (``flock``)."""
        try:
            f = open(self._mdir(name) / ".lock", "ab")
        except OSError as exc:
            raise RegistryError("model_store", f"cannot lock {name}: {exc}") from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _advance(self, name: str) -> Pointer:
        """(Under ``_locked``.) The pointer to what ``latest`` is now: a new publication
        when that is not what the pointer says."""
        version = self.latest(name).version
        cur = self._pointer(name)
        if cur is not None and cur.version == version:
            return cur
        prev = None if cur is None else cur.publication
        new = Pointer(next_publication(prev, time.time_ns() // 1_000_000), version)
        try:
            atomic_write(self._mdir(name) / "publication", msgspec.json.encode(new))
        except OSError as exc:
            raise RegistryError("model_store", f"cannot write {name}'s pointer: {exc}") from None
        return new

    def publication(self, name: str) -> Pointer:
        """``latest`` of ``name`` and its publication (``NotFound`` without versions). A
        pointer that is missing or behind (a store from before publications, a writer that
        stopped between its version and the pointer) is advanced here."""
        version = self.latest(name).version
        cur = self._pointer(name)
        if cur is not None and cur.version == version:
            return cur
        with self._locked(name):
            return self._advance(name)

    def latest_signed(self, name: str) -> Latest:
        """``latest`` with its publication, signed (what ``GET .../latest`` serves)."""
        ptr = self.publication(name)
        m = self.manifest(name, ptr.version)
        sig = self.sign_latest(name, ptr.publication, ptr.version, m.digest)
        return Latest(ptr.publication, m, sig)

    def sign_latest(self, name: str, publication: int, version: int, digest: str, *,
                    onnx: bool = False) -> str:  # fmt: skip
        """The pointer signature (``latest_onnx_message`` over the ONNX digest when
        ``onnx``); the last few are memoised (every device asks for ``latest``)."""
        build = latest_onnx_message if onnx else latest_message
        msg = build(name, publication, version, digest)
        sig = self._pointer_sigs.get(msg)
        if sig is None:
            if len(self._pointer_sigs) >= 256:
                self._pointer_sigs.clear()
            sig = self._pointer_sigs[msg] = self.signer.sign(msg)
        return sig

    def newest_version(self, name: str) -> int | None:
        vs = self.versions(name)
        return vs[-1] if vs else None

    def weights(self, m: ModelManifest) -> bytes:
        """Weights bytes (the few most recent blobs are kept in memory)."""
        hit = self._blobs.get(m.digest)
        if hit is not None:
            return hit
        try:
            data = (self.dir / "blobs" / f"{m.digest}.f32").read_bytes()
        except FileNotFoundError:
            raise NotFound("weights", m.digest) from None
        if len(data) <= BLOB_CACHE_MAX_BYTES:
            self._blobs[m.digest] = data
            while len(self._blobs) > BLOB_CACHE_ENTRIES:
                self._blobs.pop(next(iter(self._blobs)))
        return data

    def onnx(self, m: ModelManifest) -> tuple[bytes, str, str]:
        """ONNX bytes of a version, its sha256 and signature (built once per digest)."""
        path = self.dir / "onnx" / f"{m.digest}.{spec_tag(m.spec)}.onnx"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            flat = np.frombuffer(self.weights(m), dtype="<f4").astype(np.float32)
            # one path for every family: the job's base artifact with this version's weights
            data = export_version(artifact_bytes(m.spec, 0, self.artifacts), m.spec, flat)
            atomic_write(path, data)
        digest = hashlib.sha256(data).hexdigest()
        sig = self.signer.sign(onnx_message(m.model_name, m.version, digest))
        return data, digest, sig

    # ------------------------------------------------------------------ writing
    def _publish(self, job: JobSpec, state: JobSlices) -> ModelManifest:
        name = job.model_name
        raw = state.flat.astype("<f4").tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        blob = self.dir / "blobs" / f"{digest}.f32"
        if not blob.exists():
            atomic_write(blob, raw)
        newest = self.newest_version(name)
        version = 0 if newest is None else newest + 1
        m = ModelManifest(
            model_name=name,
            job_id=job.job_id,
            version=version,
            shard_versions=list(state.shard_versions),
            shard_bounds=list(job.shard_bounds),
            spec=job.spec,
            digest=digest,
            signature=self.signer.sign(weights_message(name, version, digest)),
            created_ts=time.time(),
        )
        atomic_write(self._mdir(name) / f"v{version:010d}.json", msgspec.json.encode(m))
        self._manifests[(name, version)] = m
        with self._locked(name):
            self._advance(name)  # a new latest unless a pin holds it
        self._retain(name)
        return m

    def create_initial(self, job: JobSpec) -> ModelManifest:
        """Version for a new job: ``init_params`` with every shard at version 0."""
        with self._lock:
            state = JobSlices(self.initial(job), [0] * (len(job.shard_bounds) - 1))
            self._jobs[job.job_id] = state
            return self._publish(job, state)

    def initial(self, job: JobSpec) -> F32:
        """Version 0's weights: the built-in family's generator, or the initializers of the
        job's ONNX artifact (``NotFound`` while it is not in the local artifact cache)."""
        data = None
        if job.spec.family == "onnx":
            data = artifact_bytes(job.spec, job.init_seed, self.artifacts)
        return initial_params(job.spec, job.init_seed, data)

    def republish(self, job: JobSpec) -> ModelManifest:
        """A new version of ``job`` with its current weights and ``job.spec`` (the spec
        changed: a standardize job's statistics fixed its input mean/std), so ``latest``
        and its ONNX artifact carry the new spec."""
        with self._lock:
            return self._publish(job, self._state(job))

    def _state(self, job: JobSpec) -> JobSlices:
        st = self._jobs.get(job.job_id)
        if st is not None:
            return st
        for v in reversed(self.versions(job.model_name)):
            m = self.manifest(job.model_name, v)
            if m.job_id == job.job_id:
                flat = np.frombuffer(self.weights(m), dtype="<f4").astype(np.float32)
                st = JobSlices(flat.copy(), list(m.shard_versions))
                break
        else:
            st = JobSlices(self.initial(job), [0] * (len(job.shard_bounds) - 1))
        self._jobs[job.job_id] = st
        return st

    def newest_shard_versions(self, job: JobSpec, *, io: bool = True) -> list[int] | None:
        """Newest version of each shard of ``job``: what this process assembled, or newer
        from a manifest another coordinator wrote to the shared store (the disk is
        re-read at most every ``DISK_RECHECK_S`` per job: uploads ask this per message).
        ``io=False``: answer only from memory, None if that would need the disk."""
        now = time.monotonic()
        with self._lock:
            st = self._jobs.get(job.job_id)
            hit = self._on_disk.get(job.job_id)
            fresh = hit is not None and now - hit[0] < DISK_RECHECK_S
            if not io and (st is None or not fresh):
                return None
            mine = list((st or self._state(job)).shard_versions)
        if hit is None or not fresh:
            hit = (now, self._manifest_shard_versions(job))
            self._on_disk[job.job_id] = hit
        disk = hit[1]
        if len(disk) != len(mine):
            return mine
        return [max(a, b) for a, b in zip(mine, disk, strict=True)]

    def _manifest_shard_versions(self, job: JobSpec) -> list[int]:
        for v in reversed(self.versions(job.model_name)):
            try:
                m = self.manifest(job.model_name, v)
            except NotFound:  # pruned between the scan and the read
                continue
            if m.job_id == job.job_id:
                return list(m.shard_versions)
        return []

    def apply(self, job: JobSpec, sv: ShardVersion) -> ModelManifest | None:
        """Fold one ``ShardVersion`` event in; returns the new manifest or None if stale."""
        if sv.job_id != job.job_id:
            raise RegistryError("job", f"event for {sv.job_id}, job is {job.job_id}")
        n = num_params(job.spec)
        params = decode_params(sv, 4 * n + 64)
        with self._lock:
            st = self._state(job)
            if not assemble(st, job.shard_bounds, sv, params):
                return None
            return self._publish(job, st)

    def rollback(self, name: str, version: int) -> ModelManifest:
        """Pin ``version`` as ``latest`` (a new publication if ``latest`` changes)."""
        m = self.manifest(name, version)  # NotFound if pruned/unknown
        with self._locked(name):
            atomic_write(self._mdir(name) / "pin", str(version).encode())
            self._advance(name)
        return m

    def unpin(self, name: str) -> None:
        """Serve the newest version as ``latest`` again (a new publication if it changes)."""
        if not self.versions(name):
            (self._mdir(name) / "pin").unlink(missing_ok=True)
            return
        with self._locked(name):
            (self._mdir(name) / "pin").unlink(missing_ok=True)
            self._advance(name)

    def _retain(self, name: str) -> None:
        vs = self.versions(name)
        pin = self.pinned(name)
        drop = [v for v in vs[: -self.retention] if v != pin]
        if not drop:
            return
        for v in drop:
            (self._mdir(name) / f"v{v:010d}.json").unlink(missing_ok=True)
            self._manifests.pop((name, v), None)
        live = {self.manifest(name, v).digest for v in self.versions(name)}
        for other in self.models():
            if other != name:
                live |= {self.manifest(other, v).digest for v in self.versions(other)}
        for e in os.scandir(self.dir / "blobs"):
            if e.name.endswith(".f32") and e.name[:-4] not in live:
                os.unlink(e.path)
                for art in (self.dir / "onnx").glob(f"{e.name[:-4]}.*onnx"):
                    art.unlink(missing_ok=True)
