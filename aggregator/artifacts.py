"""The aggregator's read side of model artifacts (``schemas.artifact_chunks``): an ``onnx``
job's initial weights are the initializers of its ONNX artifact, which the coordinator
wrote to ``{prefix}artifacts`` before the job reached ``fl.jobs``. ``ArtifactCache.ensure``
reads it once per digest (scan of the compacted topic, sha256 checked) and keeps it in
memory; ``artifact_of(spec)`` then answers synchronously for ``JobShard``'s version 0."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.errors import AggregatorError
from schemas.artifact_chunks import Reassembly, decode_chunk
from schemas.errors import SchemaError
from schemas.kafka_auth import KafkaTarget, as_kwargs
from schemas.messages import ModelSpecMsg

log = logging.getLogger(__name__)


class ArtifactCache:
    def __init__(self, bootstrap: KafkaTarget, topic: str, *,
                 client_id: str = "fedfleet-aggregator",
                 timeout_s: float = 60.0) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._have: dict[str, bytes] = {}

    def put(self, data: bytes, digest: str) -> None:
        self._have[digest] = data

    def artifact_of(self, spec: ModelSpecMsg) -> bytes | None:
        return self._have.get(spec.artifact) if spec.family == "onnx" else None

    async def ensure(self, spec: ModelSpecMsg) -> None:
        """Have ``spec``'s artifact (no-op for built-in families); ``AggregatorError`` if
        the topic does not hold it or Kafka does not answer in time."""
        if spec.family != "onnx" or spec.artifact in self._have:
            return
        self._have[spec.artifact] = await self._scan(spec.artifact)
        log.info("artifact %s read from %s", spec.artifact[:19], self.topic)

    async def _scan(self, digest: str) -> bytes:
        tp = TopicPartition(self.topic, 0)
        c = AIOKafkaConsumer(**as_kwargs(self.bootstrap), group_id=None,
                             enable_auto_commit=False, client_id=f"{self.client_id}-artifacts",
                             fetch_max_bytes=8 << 20)  # fmt: skip
        asm = Reassembly(digest)
        deadline = time.monotonic() + self.timeout_s
        await c.start()
        try:
            c.assign([tp])
            await c.seek_to_beginning(tp)
            end = (await c.end_offsets([tp]))[tp]
            while await c.position(tp) < end and time.monotonic() < deadline:
                for recs in (await c.getmany(tp, timeout_ms=200)).values():
                    for r in recs:
                        try:
                            got = None if r.value is None else asm.add(decode_chunk(r.value))
                        except SchemaError as exc:
                            log.warning("bad artifact chunk on %s: %s", self.topic, exc)
                            continue
                        if got is not None:
                            return got
        finally:
            await asyncio.wait_for(c.stop(), 30)
        if time.monotonic() >= deadline:
            raise AggregatorError("artifact", f"reading {self.topic} timed out")
        raise AggregatorError("artifact_missing", f"{digest} is not on {self.topic}")
