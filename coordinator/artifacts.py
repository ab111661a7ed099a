"""Model artifacts (normalised ONNX files, ``schemas.artifact``): the port and its adapters.

``ArtifactStore``: ``put(data) -> digest`` makes an artifact durable; ``get(digest)`` returns
its bytes (sha256 checked) or raises ``NotFound``; ``cached(digest)`` answers from local
disk only (sync: the registry's threads call it). Adapters:

* ``KafkaArtifacts`` — the record is the compacted topic ``{prefix}artifacts`` (chunked,
  ``schemas.artifact_chunks``); a local directory caches what this process wrote or read.
  ``put`` returns once Kafka acknowledged every chunk.
* ``MemoryArtifacts`` — a dict, for unit tests; same contract (``tests/test_artifacts.py``).

Built-in families need no stored artifact: ``artifact_for(spec, seed, store)`` generates
theirs (``schemas.artifact.builtin_artifact``); every family then takes the same path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from coordinator.errors import CoordinatorError, NotFound
from schemas.artifact import builtin_artifact, digest_of
from schemas.artifact_chunks import (
    Reassembly,
    chunk_key,
    decode_chunk,
    encode_chunk,
    split,
)
from schemas.atomic import atomic_write
from schemas.errors import SchemaError
from schemas.kafka_auth import KafkaTarget, as_kwargs
from schemas.messages import ModelSpecMsg

log = logging.getLogger(__name__)
READ_TIMEOUT_S = 60.0


class ArtifactStore(Protocol):
    async def put(self, data: bytes) -> str: ...

    async def get(self, digest: str) -> bytes: ...

    def cached(self, digest: str) -> bytes | None: ...


class DiskCache:
    """``{dir}/{hex}.onnx``; a file whose sha256 is not its name is dropped."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, digest: str) -> Path:
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise NotFound("artifact", digest)
        return self.root / f"{digest[7:]}.onnx"

    def read(self, digest: str) -> bytes | None:
        p = self._path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        if digest_of(data) != digest:
            log.warning("artifact cache: %s does not match its digest; dropped", p)
            p.unlink(missing_ok=True)
            return None
        return data

    def write(self, data: bytes) -> str:
        digest = digest_of(data)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(digest), data)
        return digest


class MemoryArtifacts:
    def __init__(self) -> None:
        self._d: dict[str, bytes] = {}

    async def put(self, data: bytes) -> str:
        d = digest_of(data)
        self._d[d] = bytes(data)
        return d

    async def get(self, digest: str) -> bytes:
        data = self._d.get(digest)
        if data is None:
            raise NotFound("artifact", digest)
        return data

    def cached(self, digest: str) -> bytes | None:
        return self._d.get(digest)


class KafkaArtifacts:
    """Artifacts on ``topic`` (one partition, compacted), cached in ``cache``."""

    def __init__(self, bootstrap: KafkaTarget, topic: str, cache: DiskCache, producer: Any,
                 *, client_id: str = "fedfleet") -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.topic = topic
        self.cache = cache
        self.producer = producer
        self.client_id = client_id
        self._lock = asyncio.Lock()

    async def put(self, data: bytes) -> str:
        digest = await asyncio.to_thread(self.cache.write, data)
        for c in split(data):
            await self.producer.send_and_wait(self.topic, value=encode_chunk(c),
                                              key=chunk_key(c.digest, c.index))  # fmt: skip
        return digest

    def cached(self, digest: str) -> bytes | None:
        return self.cache.read(digest)

    async def get(self, digest: str) -> bytes:
        hit = await asyncio.to_thread(self.cache.read, digest)
        if hit is not None:
            return hit
        async with self._lock:  # one scan at a time; a concurrent caller finds it cached
            hit = await asyncio.to_thread(self.cache.read, digest)
            if hit is None:
                hit = await read_artifact(self.bootstrap, self.topic, digest,
                                          client_id=self.client_id)  # fmt: skip
                await asyncio.to_thread(self.cache.write, hit)
            return hit


async def read_artifact(bootstrap: KafkaTarget, topic: str, digest: str, *,
                        client_id: str = "fedfleet",
                        timeout_s: float = READ_TIMEOUT_S) -> bytes:  # fmt: skip
    """Scan ``topic`` from its start to its current end for ``digest``'s chunks. ``NotFound``
    if it is not there; ``CoordinatorError`` if Kafka does not answer in ``timeout_s``."""
    tp = TopicPartition(topic, 0)
    c = AIOKafkaConsumer(**as_kwargs(bootstrap), group_id=None, enable_auto_commit=False,
                         client_id=f"{client_id}-artifacts", fetch_max_bytes=8 << 20)  # fmt: skip
    asm = Reassembly(digest)
    deadline = time.monotonic() + timeout_s
    await c.start()
    try:
        c.assign([tp])
        await c.seek_to_beginning(tp)
        end = (await c.end_offsets([tp]))[tp]
        while await c.position(tp) < end:
            if time.monotonic() > deadline:
                raise CoordinatorError("kafka", f"could not read {topic} to offset {end}")
            for recs in (await c.getmany(tp, timeout_ms=200)).values():
                for r in recs:
                    if r.value is None:
                        continue
                    try:
                        got = asm.add(decode_chunk(r.value))
                    except SchemaError as exc:
                        log.warning("bad artifact chunk on %s: %s", topic, exc)
                        continue
                    if got is not None:
                        return got
    finally:
        await asyncio.wait_for(c.stop(), 30)
    raise NotFound("artifact", digest)


@functools.lru_cache(maxsize=16)
def _builtin(spec: ModelSpecMsg, seed: int) -> bytes:
    return builtin_artifact(spec, seed)


def artifact_bytes(spec: ModelSpecMsg, seed: int, store: ArtifactStore | None) -> bytes:
    """The base artifact of a job's model, sync: generated for the built-in families (their
    standardisation is added per version, so it is not part of the key), from the local
    cache for ``onnx`` (``NotFound`` if not cached: the service fetches it with
    ``ArtifactStore.get`` when it learns of the job)."""
    if spec.family != "onnx":
        return _builtin(msgspec.structs.replace(spec, input_mean=(), input_std=()), seed)
    data = None if store is None else store.cached(spec.artifact)
    if data is None:
        raise NotFound("artifact", spec.artifact)
    return data
