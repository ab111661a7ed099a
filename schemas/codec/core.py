"""Encode a flat float32 chunk into one self-describing frame, and strictly decode it."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

from schemas.codec import frame as fr
from schemas.codec import kernels as kn
from schemas.codec import quant as qt
from schemas.errors import SchemaError
from schemas.messages import UPDATE_MAX_BYTES, CodecConfig
from schemas.types import F32

DEFAULT_MAX_FRAME_BYTES = UPDATE_MAX_BYTES
DEFAULT_MAX_DECODED_BYTES = 1 << 30
_FRAME_TYPES = (bytes, bytearray, memoryview)
_INT_TYPES = (int, np.integer)


class DecodedChunk:
    """A decoded frame: sparse ``(indices, values)`` or dense ``values`` of ``length``.

    ``indices`` are int64, strictly increasing and ``< length`` (checked by :func:`decode`,
    which also makes them read-only, so :meth:`add_to` can skip its bounds pass);
    ``values`` are finite float32. Arrays may be read-only views of the decoded buffers.
    An int8 frame keeps its quantised values: ``values`` dequantises them on first access,
    and :meth:`add_to` folds them in without materialising ``values`` at all.
    """

    __slots__ = ("_checked", "_q", "_qscale", "_values", "indices", "length")

    def __init__(
        self,
        length: int,
        indices: npt.NDArray[np.int64] | None,
        values: F32 | None,
        *,
        q: npt.NDArray[np.int8] | None = None,
        qscale: float = 1.0,
        checked: bool = False,
    ) -> None:
        if values is None and q is None:
            raise ValueError("DecodedChunk needs values or int8 q")
        self.length = length
        self.indices = indices
        self._values = values
        self._q = q
        self._qscale = qscale
        self._checked = checked

    @property
    def values(self) -> F32:
        if self._values is None:
            assert self._q is not None
            self._values = qt.dequantize_int8(self._q, self._qscale)
        return self._values

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    @property
    def size(self) -> int:
        """Number of values (k, or length when dense), without dequantising them."""
        vals = self._values if self._values is not None else self._q
        assert vals is not None
        return int(vals.shape[0])

    @property
    def finite(self) -> bool:
        """True when :func:`decode` made this chunk (it rejects NaN/Inf, so consumers may
        skip their own scan); False for a chunk built by hand."""
        return self._checked

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
        """``target += scale * delta`` in place; a sparse chunk touches only its k entries.

        Rounds exactly like ``target[indices] += np.float32(scale) * values``.
        """
        if target.ndim != 1 or target.shape[0] != self.length:
            raise SchemaError("shape", f"target shape {target.shape} != ({self.length},)")
        if self.indices is None:
            target += self.values if scale == 1.0 else self.values * np.float32(scale)
        elif self._values is None and self._q is not None and target.dtype == np.float32:
            q, qs, ok = self._q, self._qscale, self._checked
            kn.scatter_add(target, self.indices, q, scale, qs, checked=ok)
        else:
            kn.scatter_add(target, self.indices, self.values, scale, checked=self._checked)


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
    fp16 (power-of-two scale) or none (bit-exact); every stream is zstd-compressed at
    ``cfg.zstd_level`` where that pays (see :mod:`schemas.codec.frame`; value planes stay
    raw with ``cfg.zstd_values`` off). NaN/Inf or a non-float32/non-1-D input raise
    :class:`SchemaError`.
    """
    v = _check_input(values)
    n = v.shape[0]
    count = qt.topk_count(n, cfg.topk) if k is None else min(n, max(1, int(k)))
    flags = 0
    nlow = 0
    planes: list[bytes | npt.NDArray[np.uint8]] = []
    if count < n:
        idx = qt.topk_indices(v, count)
        nlow = kn.ef_choose_nlow(count, n)
        bitmap, low = kn.ef_encode(idx, n, nlow)
        planes = [bitmap, *low]
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
        nlow=nlow,
        length=n,
        k=count,
        scale=scale,
        planes=planes,
        level=cfg.zstd_level,
        index_planes=1 + nlow if flags & fr.FLAG_SPARSE else 0,
        zstd_values=cfg.zstd_values,
    )


def _indices(planes: list[bytes | memoryview], head: fr.Header) -> npt.NDArray[np.int64]:
    """The index streams are ``planes[0]`` (bitmap) and ``planes[1 : 1 + nlow]``."""
    nlow = head.nlow
    low = planes[1] if nlow == 1 else b"".join(planes[1 : 1 + nlow])
    return kn.ef_decode(planes[0], low, nlow, head.k, head.length)


def _int8_scale(scale: float) -> float:
    # |q| <= 127, so with a bounded scale every value is finite: no scan needed.
    if not 0.0 <= scale or not 127.0 * scale < qt.F32_OVERFLOW:
        reason = "non_finite" if scale != scale or scale > 0 else "codec"
        raise SchemaError(reason, f"bad int8 scale {scale!r}")
    return scale


def _values(planes: list[bytes | memoryview], head: fr.Header) -> F32:
    """Float32 values of an fp16 or lossless frame (int8 keeps its plane, see decode)."""
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


def _int8(plane: bytes | memoryview) -> npt.NDArray[np.int8]:
    q = np.frombuffer(plane, dtype=np.int8)
    if kn.has_int8_min(q):
        raise SchemaError("codec", "int8 value -128 is never produced by the encoder")
    return q


_QUANT_INT8: Final = fr.QUANT_CODES["int8"]


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
    if not isinstance(frame, _FRAME_TYPES):
        raise SchemaError("codec", f"expected bytes, got {type(frame).__name__}")
    if isinstance(expected_length, bool) or not isinstance(expected_length, _INT_TYPES):
        raise SchemaError("shape", f"expected_length must be an int, got {expected_length!r}")
    if not 1 <= expected_length <= fr.MAX_LENGTH:
        raise SchemaError("shape", f"expected_length {expected_length} out of range")
    if len(frame) > max_frame_bytes:
        raise SchemaError("too_large", f"frame of {len(frame)} bytes > {max_frame_bytes}")
    try:
        head = fr.parse(frame, int(expected_length))
        if head.k * len(head.sizes) > max_decoded_bytes:
            raise SchemaError("too_large", f"{head.k * len(head.sizes)} decoded bytes > limit")
        planes = fr.read_planes(frame, head)
        n_index = 1 + head.nlow if head.flags & fr.FLAG_SPARSE else 0
        q: npt.NDArray[np.int8] | None = None
        values: F32 | None = None
        qscale = 1.0
        # checked in this order: values (scale, finiteness, int8 range), then indices
        if head.quant == _QUANT_INT8:
            qscale = _int8_scale(head.scale)
            q = _int8(planes[n_index])
        else:
            values = _values(planes[n_index:], head)
        indices = None
        if n_index:
            indices = _indices(planes, head)
            indices.setflags(write=False)  # add_to relies on them staying as checked
    except SchemaError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, zstandard.ZstdError) as exc:
        raise SchemaError("codec", f"{type(exc).__name__}: {exc}") from None
    if q is not None and indices is None:  # dense int8: materialise once, as before
        return DecodedChunk(head.length, None, qt.dequantize_int8(q, qscale), checked=True)
    return DecodedChunk(head.length, indices, values, q=q, qscale=qscale, checked=True)
