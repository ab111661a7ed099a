"""Pure value transforms of the codec: top-k selection and int8 / fp16 quantisation."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from schemas.types import F32

FP16_MAX_EXP = 15  # values are scaled into [2**14, 2**15) before the fp16 cast
_F32_TINY = float(np.finfo(np.float32).tiny)
F32_OVERFLOW = 2.0**128 - 2.0**103  # smallest real that rounds to inf in float32


def topk_count(length: int, topk: float) -> int:
    """Entries kept for a chunk of ``length``: ``max(1, ceil(topk*length))``, 0 means dense.

    ``topk*length`` is rounded to 9 decimals first so that e.g. ``0.07*100`` (which is
    ``7.000000000000001`` in binary floating point) keeps 7, not 8.
    """
    if topk <= 0.0:
        return length
    return min(length, max(1, math.ceil(round(topk * length, 9))))


def topk_indices(values: F32, k: int) -> npt.NDArray[np.int64]:
    """Sorted indices of the ``k`` largest magnitudes (ties broken arbitrarily)."""
    n = values.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(np.abs(values), n - k)[n - k :]
    part.sort()
    return part.astype(np.int64, copy=False)


def int8_scale(values: F32) -> float:
    """Per-chunk scale ``max|v|/127`` as a float32, floored at the smallest normal float32."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return 0.0
    scale = np.float32(max(peak / 127.0, _F32_TINY))
    while 127.0 * float(scale) >= F32_OVERFLOW:  # 127 * scale must stay finite in float32
        scale = np.nextafter(scale, np.float32(0))
    return float(scale)


def quantize_int8(
    values: F32, scale: float, rng: np.random.Generator | None = None
) -> npt.NDArray[np.int8]:
    """Round ``values/scale`` to int8 in [-127, 127]; stochastic (unbiased) when ``rng``."""
    if scale == 0.0:
        return np.zeros(values.shape[0], dtype=np.int8)
    x = values / np.float32(scale)
    if rng is None:
        np.rint(x, out=x)
    else:
        x += rng.random(x.shape[0], dtype=np.float32)
        np.floor(x, out=x)
    np.clip(x, -127.0, 127.0, out=x)
    return x.astype(np.int8)


def dequantize_int8(q: npt.NDArray[np.int8], scale: float) -> F32:
    """``q * scale`` as float32 (one pass, no temporaries)."""
    return np.multiply(q, np.float32(scale), dtype=np.float32)


def fp16_scale(values: F32) -> float:
    """Power-of-two scale that maps ``max|v|`` into [2**14, 2**15): exact, never overflows."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return 1.0
    _, exp = math.frexp(peak)  # peak = m * 2**exp, m in [0.5, 1)
    return math.ldexp(1.0, max(exp - FP16_MAX_EXP, -126))


def quantize_fp16(values: F32, scale: float) -> npt.NDArray[np.float16]:
    """``values/scale`` as float16 (scale is a power of two, so the division is exact)."""
    return (values / np.float32(scale)).astype(np.float16)


def dequantize_fp16(h: npt.NDArray[np.float16], scale: float) -> F32:
    """``h * scale`` as float32."""
    return np.multiply(h, np.float32(scale), dtype=np.float32)
