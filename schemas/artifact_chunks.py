"""Model artifacts on Kafka: a normalised ONNX file (``schemas.artifact``) cut into chunks
on the compacted topic ``{prefix}artifacts``, so no broker or client needs a message-size
setting of its own (a 100k-parameter CNN is ~400 KB, the size cap is far above Kafka's
1 MiB default).

Record key ``{digest}:{index:06d}``, value ``ArtifactChunk`` (MessagePack). The writer (the
coordinator, at job creation) sends every chunk and waits for Kafka's ack before the job
is recorded; a reader (an aggregator or a coordinator without the file on disk) reads the
topic and keeps the chunks of the digest it wants until ``Reassembly`` has them all and
their sha256 is that digest. Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.artifact import digest_of
from schemas.errors import SchemaError
from schemas.messages import ARTIFACT_DIGEST

CHUNK_BYTES = 512 * 1024
MAX_CHUNKS = 1 << 12  # 2 GiB at the default chunk size: above any size cap


class ArtifactChunk(msgspec.Struct, frozen=True, kw_only=True, tag="artifact_chunk"):
    digest: Annotated[str, msgspec.Meta(pattern=ARTIFACT_DIGEST)]
    index: Annotated[int, msgspec.Meta(ge=0, lt=MAX_CHUNKS)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNKS)]
    size: Annotated[int, msgspec.Meta(ge=1)]  # bytes of the whole artifact
    data: bytes


def chunk_key(digest: str, index: int) -> bytes:
    return f"{digest}:{index:06d}".encode()


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[ArtifactChunk]:
    """``data`` as chunks of at most ``chunk_bytes`` (in order)."""
    if not data:
        raise SchemaError("shape", "an artifact has at least one byte")
    if chunk_bytes < 1:
        raise SchemaError("range", f"chunk_bytes must be >= 1, got {chunk_bytes}")
    digest = digest_of(data)
    count = -(-len(data) // chunk_bytes)
    if count > MAX_CHUNKS:
        raise SchemaError("too_large", f"{len(data)} bytes need {count} chunks > {MAX_CHUNKS}")
    return [
        ArtifactChunk(digest=digest, index=i, count=count, size=len(data),
                      data=data[i * chunk_bytes : (i + 1) * chunk_bytes])
        for i in range(count)
    ]


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(ArtifactChunk)


def encode_chunk(c: ArtifactChunk) -> bytes:
    return _enc.encode(c)


def decode_chunk(value: bytes) -> ArtifactChunk:
    """A chunk record's value; a bad one is a ``SchemaError``."""
    try:
        c = _dec.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SchemaError("decode", f"bad artifact chunk: {exc}") from None
    if c.index >= c.count or len(c.data) > c.size:
        raise SchemaError("shape", f"chunk {c.index} of {c.count} ({len(c.data)} bytes) is "
                                   f"inconsistent with an artifact of {c.size} bytes")  # fmt: skip
    return c


class Reassembly:
    """Collects the chunks of one digest; ``add`` returns the artifact once it is whole and
    its sha256 matches (a mismatch drops what it had: the next copy on the topic is
    tried). Chunks of other digests are ignored."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self._parts: dict[int, bytes] = {}
        self._shape: tuple[int, int] | None = None  # (count, size)

    def add(self, c: ArtifactChunk) -> bytes | None:
        if c.digest != self.digest:
            return None
        if self._shape != (c.count, c.size):
            self._parts, self._shape = {}, (c.count, c.size)
        self._parts[c.index] = c.data
        if len(self._parts) < c.count:
            return None
        data = b"".join(self._parts[i] for i in range(c.count))
        if len(data) != c.size or digest_of(data) != self.digest:
            self._parts = {}
            return None
        return data
