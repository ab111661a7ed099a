"""Error feedback and shard cutting on top of :func:`schemas.codec.core.encode`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from schemas.codec.core import decode, encode
from schemas.errors import SchemaError
from schemas.messages import CodecConfig
from schemas.types import F32

ShardFrame = tuple[int, int, int, bytes]


def encode_with_feedback(
    delta: np.ndarray,
    residual: np.ndarray | None,
    cfg: CodecConfig,
    *,
    rng: np.random.Generator | None = None,
) -> tuple[bytes, F32]:
    """Encode ``v = delta + residual`` and return ``(frame, v - decoded(frame))``.

    The residual is exactly what the receiver will *not* see, computed from the decoded
    frame itself, so over any sequence ``sum(sent) + residual == sum(deltas)`` up to float
    rounding. With ``cfg.error_feedback`` off the residual is ignored and zeros come back.
    """
    v = delta
    if cfg.error_feedback and residual is not None:
        if not isinstance(residual, np.ndarray) or residual.shape != np.shape(delta):
            raise SchemaError("shape", "residual does not match the delta's shape")
        if not isinstance(delta, np.ndarray) or residual.dtype != delta.dtype:
            raise SchemaError("shape", "residual dtype does not match the delta's dtype")
        v = delta + residual
    frame = encode(v, cfg, rng=rng)
    if not cfg.error_feedback:
        return frame, np.zeros(v.shape[0], dtype=np.float32)
    chunk = decode(frame, v.shape[0], max_frame_bytes=len(frame))
    new_residual = v.copy() if v is delta else v
    chunk.add_to(new_residual, -1.0)
    return frame, new_residual


def check_bounds(bounds: Sequence[int], length: int) -> list[int]:
    """Shard bounds must be ints, start at 0, strictly increase and end at ``length``."""
    b = [int(x) for x in bounds]
    if len(b) < 2 or b[0] != 0 or b[-1] != length:
        raise SchemaError("shape", f"bounds {b[:4]}... do not cover [0, {length})")
    if any(x >= y for x, y in itertools.pairwise(b)):
        raise SchemaError("shape", "bounds must strictly increase")
    return b


def encode_update(
    delta: np.ndarray,
    bounds: Sequence[int],
    cfg: CodecConfig,
    residual: np.ndarray | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> tuple[list[ShardFrame], F32]:
    """Cut the full flat ``delta`` by shard ``bounds`` and encode every slice.

    Returns ``[(shard, start, stop, frame)]`` and the new full-length residual (zeros when
    ``cfg.error_feedback`` is off). ``residual`` must have the delta's shape.
    """
    if not isinstance(delta, np.ndarray) or delta.ndim != 1:
        raise SchemaError("shape", "delta must be a 1-D array")
    b = check_bounds(bounds, delta.shape[0])
    if residual is not None and (
        not isinstance(residual, np.ndarray) or residual.shape != delta.shape
    ):
        raise SchemaError("shape", "residual does not match the delta's shape")
    new_residual = np.zeros(delta.shape[0], dtype=np.float32)
    frames: list[ShardFrame] = []
    for s, (start, stop) in enumerate(itertools.pairwise(b)):
        res = residual[start:stop] if residual is not None else None
        frame, res_out = encode_with_feedback(delta[start:stop], res, cfg, rng=rng)
        new_residual[start:stop] = res_out
        frames.append((s, start, stop, frame))
    return frames, new_residual


def decode_update(
    frames: Sequence[ShardFrame], bounds: Sequence[int], length: int
) -> npt.NDArray[np.float32]:
    """Reassemble a full dense delta from ``encode_update`` frames (tests, simulator)."""
    b = check_bounds(bounds, length)
    out = np.zeros(length, dtype=np.float32)
    for shard, start, stop, frame in frames:
        if not 0 <= shard < len(b) - 1 or (b[shard], b[shard + 1]) != (start, stop):
            raise SchemaError("shape", f"chunk {shard} [{start}, {stop}) not in the manifest")
        decode(frame, stop - start).add_to(out[start:stop])
    return out
