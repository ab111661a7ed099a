"""Model artifacts on Kafka: the chunk format (pure), and one contract for the
``ArtifactStore`` adapters (``MemoryArtifacts`` and ``KafkaArtifacts`` on the real broker),
plus the aggregator's reader (``aggregator.artifacts.ArtifactCache``) on the same topic."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import given
from hypothesis import strategies as st

from aggregator.artifacts import ArtifactCache
from aggregator.errors import AggregatorError
from coordinator.artifacts import (
    ArtifactStore,
    DiskCache,
    KafkaArtifacts,
    MemoryArtifacts,
    artifact_bytes,
)
from coordinator.errors import NotFound
from schemas.artifact import digest_of
from schemas.artifact_chunks import (
    ArtifactChunk,
    Reassembly,
    decode_chunk,
    encode_chunk,
    split,
)
from schemas.errors import SchemaError
from schemas.messages import ModelSpecMsg, ParamMsg
from stack import StackInfo

# ------------------------------------------------------------------------------ chunks


@given(st.binary(min_size=1, max_size=5000), st.integers(min_value=1, max_value=700))
def test_chunks_reassemble_in_any_order(data: bytes, size: int) -> None:
    chunks = split(data, size)
    assert all(len(c.data) <= size for c in chunks) and chunks[0].count == len(chunks)
    asm = Reassembly(digest_of(data))
    got = None
    for c in reversed([decode_chunk(encode_chunk(c)) for c in chunks]):
        got = asm.add(c) or got
    assert got == data


def test_a_corrupt_or_foreign_chunk_never_yields_an_artifact() -> None:
    data = os.urandom(3000)
    chunks = split(data, 1000)
    asm = Reassembly(digest_of(data))
    other = split(b"x" * 10, 4)[0]
    assert asm.add(other) is None  # another digest: ignored
    bad = ArtifactChunk(digest=chunks[1].digest, index=1, count=3, size=3000, data=b"\0" * 1000)
    assert asm.add(chunks[0]) is None and asm.add(bad) is None
    assert asm.add(chunks[2]) is None  # whole but the sha256 does not match: dropped
    for c in chunks:
        got = asm.add(c)
    assert got == data  # the next good copy completes it
    with pytest.raises(SchemaError):
        decode_chunk(b"\x93garbage")
    with pytest.raises(SchemaError):
        split(b"")


def test_the_disk_cache_drops_a_file_that_is_not_its_digest(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    d = cache.write(b"model bytes")
    assert cache.read(d) == b"model bytes"
    (tmp_path / f"{d[7:]}.onnx").write_bytes(b"tampered")
    assert cache.read(d) is None and not (tmp_path / f"{d[7:]}.onnx").exists()
    with pytest.raises(NotFound):
        cache.read("sha1:abc")


def test_builtin_families_generate_their_artifact() -> None:
    spec = ModelSpecMsg(family="softmax", n_features=4, n_classes=3)
    std = ModelSpecMsg(family="softmax", n_features=4, n_classes=3, input_mean=(0.0,) * 4,
                       input_std=(1.0,) * 4)  # fmt: skip
    assert artifact_bytes(spec, 0, None) == artifact_bytes(std, 0, None)  # no std in the base
    with pytest.raises(NotFound):  # an onnx job's artifact must be in the store's cache
        artifact_bytes(_onnx_spec("sha256:" + "a" * 64), 0, MemoryArtifacts())


# ------------------------------------------------------------------------------ contract


@pytest.fixture(params=["memory", "kafka"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None (memory) or the real broker and a fresh topic name (Kafka)."""
    if request.param == "memory":
        return None
    info: StackInfo = request.getfixturevalue("stack")
    return info.kafka_bootstrap, f"{request.getfixturevalue('unique_prefix')}artifacts"


@pytest.fixture
async def store(backend: tuple[str, str] | None, tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    if backend is None:
        yield MemoryArtifacts()
        return
    bootstrap, topic = backend
    await _topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        yield KafkaArtifacts(bootstrap, topic, DiskCache(tmp_path / "a"), producer)
    finally:
        await producer.stop()


async def _topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        compact = {"cleanup.policy": "compact"}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=compact)])
    finally:
        await admin.close()


async def test_store_contract(store: ArtifactStore) -> None:
    big = os.urandom(1_300_000)  # three chunks
    small = b"onnx" * 100
    d_big, d_small = await store.put(big), await store.put(small)
    assert d_big == digest_of(big) and d_small == digest_of(small)
    assert await store.get(d_big) == big and await store.get(d_small) == small
    assert store.cached(d_small) == small
    with pytest.raises(NotFound):
        await store.get("sha256:" + "0" * 64)


@pytest.mark.integration
async def test_kafka_artifacts_survive_a_lost_disk_and_reach_the_aggregator(
    stack: StackInfo, unique_prefix: str, tmp_path: Path
) -> None:
    topic = f"{unique_prefix}artifacts"
    await _topic(stack.kafka_bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        data = os.urandom(700_000)
        writer = KafkaArtifacts(stack.kafka_bootstrap, topic, DiskCache(tmp_path / "w"), producer)
        digest = await writer.put(data)
        fresh = KafkaArtifacts(stack.kafka_bootstrap, topic, DiskCache(tmp_path / "r"), producer)
        assert fresh.cached(digest) is None
        assert await fresh.get(digest) == data  # read back from Kafka
        assert fresh.cached(digest) == data  # and cached on its disk
        spec = ModelSpecMsg(family="softmax", n_features=2, n_classes=2)
        agg = ArtifactCache(stack.kafka_bootstrap, topic, timeout_s=20)
        await agg.ensure(spec)  # built-in: nothing to read
        fake = _onnx_spec(digest)
        await agg.ensure(fake)
        assert agg.artifact_of(fake) == data
        with pytest.raises(AggregatorError):
            await agg.ensure(_onnx_spec("sha256:" + "1" * 64))
    finally:
        await producer.stop()


def _onnx_spec(digest: str) -> ModelSpecMsg:
    return ModelSpecMsg(family="onnx", n_features=2, n_classes=2, artifact=digest,
                        params=(ParamMsg("w", (2, 2)),), input_shape=(2,))  # fmt: skip
