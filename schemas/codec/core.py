"""Encode a flat float32 chunk into one self-describing frame, and strictly decode it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import zstandard

from schemas.codec import frame as fr
from schemas.codec import quant as qt
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, CodecConfig

F32 = npt.NDArray[np.float32]
DEFAULT_MAX_FRAME_BYTES = UPDATE_MAX_BYTES
DEFAULT_MAX_DECODED_BYTES = 1 << 30
_GAP_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    3: np.dtype("<u4"),
    4: np.dtype("<u4"),
}


class DecodedChunk:
    """A decoded frame: sparse ``(indices, values)`` or dense ``values`` of ``length``.

    ``indices`` are int64, strictly increasing and ``< length`` (checked by :func:`decode`);
    ``values`` are finite float32. Arrays may be read-only views of the decoded buffers.
    """

    __slots__ = ("indices", "length", "values")

    def __init__(self, length: int, indices: npt.NDArray[np.int64] | None, values: F32) -> None:
        self.length = length
        self.indices = indices
        self.values = values

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    def __repr__(self) -> str:
        n = self.values.shape[0]
        kind = f"sparse k={n}" if self.indices is not None else "dense"
        return f"DecodedChunk(length={self.length}, {kind})"

    def to_dense(self) -> F32:
        """A new float32[length] array (use ``values`` for zero-copy access to a dense chunk)."""
        if self.indices is None:
            return self.values.copy()
        out = np.zeros(self.length, dtype=np.float32)
        out[self.indices] = self.values
        return out

    def add_to(self, target: npt.NDArray[np.floating], scale: float = 1.0) -> None:
        """``target += scale * delta`` in place; a sparse chunk touches only its k entries."""
        if target.ndim != 1 or target.shape[0] != self.length:
            raise SchemaError("shape", f"target shape {target.shape} != ({self.length},)")
        vals = self.values if scale == 1.0 else self.values * np.float32(scale)
        if self.indices is None:
            target += vals
        else:
            target[self.indices] += vals


def _check_input(values: np.ndarray) -> F32:
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        dtype = getattr(values, "dtype", type(values).__name__)
        raise SchemaError("shape", f"expected a 1-D float32 array, got {dtype}")
    if values.shape[0] < 1 or values.shape[0] > fr.MAX_LENGTH:
        raise SchemaError("shape", f"chunk length {values.shape[0]} out of range")
    if not np.isfinite(values).all():
        raise SchemaError("non_finite", "chunk contains NaN or Inf")
    return values


def encode(
    values: np.ndarray,
    cfg: CodecConfig,
    *,
    rng: np.random.Generator | None = None,
    k: int | None = None,
) -> bytes:
    """Encode one flat float32 chunk as a self-describing frame.

    ``cfg.topk`` > 0 keeps the ``max(1, ceil(topk*length))`` largest magnitudes (``k``
    overrides it with an exact count); ``cfg.quant`` picks int8 (per-chunk scale
    ``max|v|/127``, round-to-nearest, or unbiased stochastic rounding when ``rng`` is given),
    fp16 (power-of-two scale) or none (bit-exact); every byte plane is zstd-compressed at
    ``cfg.zstd_level``. NaN/Inf or a non-float32/non-1-D input raise :class:`SchemaError`.
    """
    v = _check_input(values)
    n = v.shape[0]
    count = qt.topk_count(n, cfg.topk) if k is None else min(n, max(1, int(k)))
    flags = 0
    width = 0
    planes: list[npt.NDArray[np.uint8]] = []
    if count < n:
        idx = qt.topk_indices(v, count)
        gaps = np.diff(idx, prepend=np.int64(0))
        width = max(1, (int(gaps.max()).bit_length() + 7) // 8)
        planes = fr.byte_planes(gaps.astype(_GAP_DTYPES[width]))[:width]
        v = v[idx]
        flags |= fr.FLAG_SPARSE
    quant = fr.QUANT_CODES[cfg.quant]
    scale = 1.0
    if cfg.quant == "int8":
        scale = qt.int8_scale(v)
        planes += fr.byte_planes(qt.quantize_int8(v, scale, rng))
        if rng is not None:
            flags |= fr.FLAG_STOCHASTIC
    elif cfg.quant == "fp16":
        scale = qt.fp16_scale(v)
        planes += fr.byte_planes(qt.quantize_fp16(v, scale).astype("<f2", copy=False))
    else:
        planes += fr.byte_planes(v.astype("<f4", copy=False))
    return fr.pack(
        quant=quant,
        flags=flags,
        width=width,
        length=n,
        k=count,
        scale=scale,
        planes=planes,
        level=cfg.zstd_level,
    )


def _indices(planes: list[bytes], head: fr.Header) -> npt.NDArray[np.int64]:
    gaps = fr.join_planes(planes, _GAP_DTYPES[head.width])
    if head.k > 1 and np.count_nonzero(gaps[1:]) != head.k - 1:
        raise SchemaError("indices", "duplicate indices (zero gap)")
    if head.width >= 3 and int(gaps.max()) >= head.length:
        raise SchemaError("indices", "index gap out of range")
    idx = np.cumsum(gaps, dtype=np.int64)
    if idx[-1] >= head.length:
        raise SchemaError("indices", f"index {int(idx[-1])} out of range {head.length}")
    return idx


def _values(planes: list[bytes], head: fr.Header) -> F32:
    if head.quant == fr.QUANT_CODES["int8"]:
        # |q| <= 127, so with a bounded scale every value is finite: no scan needed.
        if not 0.0 <= head.scale or not 127.0 * head.scale < qt.F32_OVERFLOW:
            reason = "non_finite" if head.scale != head.scale or head.scale > 0 else "codec"
            raise SchemaError(reason, f"bad int8 scale {head.scale!r}")
        q = np.frombuffer(planes[0], dtype=np.int8)
        if int(q.min()) == -128:
            raise SchemaError("codec", "int8 value -128 is never produced by the encoder")
        return qt.dequantize_int8(q, head.scale)
    if head.quant == fr.QUANT_CODES["fp16"]:
        if not (0.0 < head.scale < float("inf")):
            raise SchemaError("codec", "bad fp16 scale")
        with np.errstate(over="ignore", invalid="ignore"):
            half = fr.join_planes(planes, "<f2")
            vals = qt.dequantize_fp16(half, head.scale)  # type: ignore[arg-type]
    else:
        if head.scale != 1.0:
            raise SchemaError("codec", "lossless frame must have scale 1")
        vals = fr.join_planes(planes, "<f4").astype(np.float32, copy=False)
    if not np.isfinite(vals).all():
        raise SchemaError("non_finite", "decoded values contain NaN or Inf")
    return vals


def decode(
    frame: bytes | bytearray | memoryview,
    expected_length: int,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> DecodedChunk:
    """Strictly decode a frame for a chunk of ``expected_length`` parameters.

    Any malformed input raises :class:`SchemaError` with reason ``codec`` (header, zstd,
    checksum), ``shape`` (length/count mismatch), ``indices`` (duplicate or out of range),
    ``non_finite`` or ``too_large``; never another exception. Decompressed sizes are
    fixed by the header and checked before any allocation (zstd bombs are rejected).
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise SchemaError("codec", f"expected bytes, got {type(frame).__name__}")
    if isinstance(expected_length, bool) or not isinstance(expected_length, int | np.integer):
        raise SchemaError("shape", f"expected_length must be an int, got {expected_length!r}")
    if not 1 <= expected_length <= fr.MAX_LENGTH:
        raise SchemaError("shape", f"expected_length {expected_length} out of range")
    if len(frame) > max_frame_bytes:
        raise SchemaError("too_large", f"frame of {len(frame)} bytes > {max_frame_bytes}")
    try:
        head = fr.parse(frame, int(expected_length))
        n_streams = len(head.sizes)
        if head.k * n_streams > max_decoded_bytes:
            raise SchemaError("too_large", f"{head.k * n_streams} decoded bytes > limit")
        planes = fr.read_planes(frame, head)
        values = _values(planes[head.width :], head)
        indices = _indices(planes[: head.width], head) if head.sparse else None
    except SchemaError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, zstandard.ZstdError) as exc:
        raise SchemaError("codec", f"{type(exc).__name__}: {exc}") from None
    return DecodedChunk(head.length, indices, values)
