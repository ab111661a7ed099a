"""Index decoding and sparse apply: the C kernels when built, else the same rules in numpy.

``schemas/codec/_kernels.c`` is an optional extension (``setup.py``); without a compiler, or
with ``FEDFLEET_CODEC_KERNELS=0`` in the environment at import time, the numpy functions
below run instead. Both paths accept and reject exactly the same inputs and give the same
results (``tests/test_codec_kernels.py``); the C path is 2–4× faster on top-1% updates
(``BENCHMARKS.md``) and releases the GIL.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import numpy.typing as npt

from schemas.codec import quant as qt
from schemas.errors import SchemaError
from schemas.types import F32

I64 = npt.NDArray[np.int64]


def _load() -> ModuleType | None:
    if os.environ.get("FEDFLEET_CODEC_KERNELS", "1").strip().lower() in {"0", "false", "no"}:
        return None
    try:
        from schemas.codec import _kernels
    except ImportError:
        return None
    return _kernels


_C = _load()
HAVE_C = _C is not None


def ef_bitmap_bytes(k: int, length: int, nlow: int) -> int:
    """Size of the unary high-part bitmap for ``k`` indices below ``length``."""
    return (k + ((length - 1) >> (8 * nlow)) + 1 + 7) // 8


def ef_choose_nlow(k: int, length: int) -> int:
    """Low bytes per index (0..3) that make the Elias–Fano index part smallest."""
    return min(range(4), key=lambda n: (k * n + ef_bitmap_bytes(k, length, n), n))


def ef_encode(idx: I64, length: int, nlow: int) -> tuple[npt.NDArray[np.uint8], list[bytes]]:
    """Strictly increasing ``idx`` → (little-endian bitmap of the high parts, low byte planes)."""
    k = idx.shape[0]
    shift = 8 * nlow
    bits = np.zeros(ef_bitmap_bytes(k, length, nlow) * 8, dtype=np.uint8)
    bits[(idx >> shift) + np.arange(k, dtype=np.int64)] = 1
    packed = np.packbits(bits, bitorder="little")
    le = idx.astype("<u4").view(np.uint8).reshape(k, 4)
    return packed, [le[:, j].tobytes() for j in range(nlow)]


def ef_decode(
    bits: memoryview | bytes, low: memoryview | bytes, nlow: int, k: int, length: int
) -> I64:
    """Inverse of :func:`ef_encode`; ``low`` is the ``nlow`` planes concatenated.

    Raises ``SchemaError("indices")`` unless the result is ``k`` strictly increasing indices
    below ``length`` (and ``SchemaError("codec")`` for a bitmap of the wrong size).
    """
    if len(bits) != ef_bitmap_bytes(k, length, nlow) or len(low) != nlow * k:
        raise SchemaError("codec", "index streams do not match k and length")
    if _C is not None:
        out = np.empty(k, dtype=np.int64)
        try:
            _C.ef_decode(bits, low, nlow, k, length, out)
        except ValueError as exc:
            raise SchemaError("indices", str(exc)) from None
        return out
    pos = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    out = np.flatnonzero(pos.view(np.bool_))
    if out.shape[0] != k:
        many = out.shape[0] > k
        raise SchemaError("indices", f"{'more' if many else 'fewer'} set bits than indices")
    out -= _arange(k)  # high parts, non-decreasing
    if int(out[-1]) > (length - 1) >> (8 * nlow):
        raise SchemaError("indices", "index out of range")
    if nlow:
        out <<= 8 * nlow
        planes = np.frombuffer(low, dtype=np.uint8).reshape(nlow, k)
        np.bitwise_or(out, planes[0], out=out)
        for j in range(1, nlow):
            out |= planes[j].astype(np.int64) << (8 * j)
    if int(out[-1]) >= length:
        raise SchemaError("indices", "index out of range")
    if k > 1 and not bool((out[1:] > out[:-1]).all()):
        raise SchemaError("indices", "indices not strictly increasing")
    return out


_AR = np.arange(0, dtype=np.int64)


def _arange(k: int) -> I64:
    """A read-only ``arange(k)`` from a shared, growing buffer (saves an allocation per call)."""
    global _AR
    ar = _AR
    if ar.shape[0] < k:
        ar = np.arange(max(k, 2 * ar.shape[0]), dtype=np.int64)
        ar.flags.writeable = False
        _AR = ar
    return ar[:k]


def has_int8_min(q: npt.NDArray[np.int8]) -> bool:
    """True if the contiguous int8 array ``q`` holds -128 (a value the encoder never makes)."""
    if _C is not None:
        return bool(_C.has_int8_min(q))
    return bool(q.size) and int(q.min()) == -128


def scatter_add(
    target: F32,
    idx: npt.NDArray[np.integer],
    vals: F32 | npt.NDArray[np.int8],
    scale: float,
    qscale: float = 1.0,
    *,
    checked: bool = False,
) -> None:
    """``target[idx] += scale * v`` in place, ``v = vals`` (float32) or ``vals * qscale`` (int8).

    Indices must be unique and in range; both paths round exactly like numpy's
    ``target[idx] += np.float32(scale) * v`` (the C path bounds-checks every index before
    writing anything and raises ``IndexError``, as numpy does). ``checked=True`` skips
    that pass: only for indices :func:`decode` has validated against ``len(target)``.
    """
    if (
        _C is not None
        and target.dtype == np.float32
        and idx.dtype == np.int64
        and vals.dtype in (np.float32, np.int8)
        and target.flags.c_contiguous
        and target.flags.writeable
    ):
        ci, cv = np.ascontiguousarray(idx), np.ascontiguousarray(vals)
        _C.scatter_add(target, ci, cv, scale, qscale, checked)
        return
    v = vals if vals.dtype == np.float32 else qt.dequantize_int8(vals, qscale)  # type: ignore[arg-type]
    s = np.float32(scale)
    target[idx] += v if s == 1.0 else s * v
