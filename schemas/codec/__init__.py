"""The update codec: top-k sparsification, int8/fp16 quantisation, zstd, error feedback.

Part of the wire format (both the agent and the aggregator import it). A frame is
self-describing; see ``schemas/codec/frame.py`` for the layout and ``docs/codec.md`` for the
design, the measurements behind it and the fuzz commands.

    encode(values, cfg, *, rng=None, k=None) -> bytes
    decode(frame, expected_length, *, max_frame_bytes=..., max_decoded_bytes=...) -> DecodedChunk
    encode_with_feedback(delta, residual, cfg, *, rng=None) -> (bytes, residual)
    encode_update(delta, bounds, cfg, residual=None, *, rng=None) -> ([(shard, start, stop,
        frame)], residual)

Every decoding failure is a :class:`schemas.errors.SchemaError` whose ``reason`` is one of
``codec``, ``shape``, ``indices``, ``non_finite``, ``too_large``.
"""

from __future__ import annotations

from schemas.codec.core import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    DecodedChunk,
    decode,
    encode,
)
from schemas.codec.feedback import (
    ShardFrame,
    check_bounds,
    decode_update,
    encode_update,
    encode_with_feedback,
)
from schemas.codec.frame import FORMAT_VERSION, MAGIC
from schemas.codec.quant import topk_count
from schemas.messages import CodecConfig

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "CodecConfig",
    "DecodedChunk",
    "ShardFrame",
    "check_bounds",
    "decode",
    "decode_update",
    "encode",
    "encode_update",
    "encode_with_feedback",
    "topk_count",
]
