"""Properties of the update codec (schemas.codec): round trips, error bounds, top-k.

Error feedback and shard cutting are in ``test_codec_feedback.py``; what encode and decode
refuse (hand-built frames) in ``test_codec_frames.py``.
"""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import CodecConfig, DecodedChunk, decode, encode, topk_count
from schemas.codec import frame as fr
from schemas.errors import SchemaError
from tests.test_codec_support import arrays, configs, moderate_f32


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------------------ round trips


@settings(deadline=None)
@given(arrays())
def test_lossless_dense_round_trip_is_bit_exact(v: np.ndarray) -> None:
    chunk = decode(encode(v, CodecConfig(quant="none")), v.shape[0])
    assert chunk.indices is None
    assert np.array_equal(_bits(chunk.to_dense()), _bits(v))


@settings(deadline=None)
@given(arrays(), st.sampled_from([0.01, 0.1, 0.5]))
def test_lossless_sparse_keeps_exact_values(v: np.ndarray, topk: float) -> None:
    chunk = decode(encode(v, CodecConfig(quant="none", topk=topk)), v.shape[0])
    if chunk.indices is not None:
        assert np.array_equal(_bits(chunk.values), _bits(v[chunk.indices]))


@settings(deadline=None)
@given(arrays(moderate_f32))
def test_int8_error_at_most_half_scale(v: np.ndarray) -> None:
    frame = encode(v, CodecConfig(quant="int8"))
    scale = struct.unpack_from("<f", frame, 16)[0]
    peak = float(np.abs(v).max())
    assert scale == pytest.approx(peak / 127, rel=1e-6, abs=float(np.finfo(np.float32).tiny))
    err = np.abs(decode(frame, v.shape[0]).to_dense().astype(np.float64) - v)
    assert float(err.max()) <= scale / 2 * (1 + 1e-5) + 1e-30


@settings(deadline=None)
@given(arrays(moderate_f32), st.integers(0, 2**32 - 1))
def test_int8_stochastic_rounding_error_below_scale(v: np.ndarray, seed: int) -> None:
    cfg = CodecConfig(quant="int8")
    frame = encode(v, cfg, rng=np.random.default_rng(seed))
    assert frame[6] & fr.FLAG_STOCHASTIC
    assert frame == encode(v, cfg, rng=np.random.default_rng(seed))  # reproducible by seed
    scale = struct.unpack_from("<f", frame, 16)[0]
    err = np.abs(decode(frame, v.shape[0]).to_dense().astype(np.float64) - v)
    assert float(err.max()) <= scale * (1 + 1e-5) + 1e-30


def test_int8_stochastic_rounding_is_unbiased() -> None:
    v = np.full(20_000, 0.3, dtype=np.float32)
    v[0] = 127.0  # scale 1.0: every other value sits 30% of the way to the next level
    out = decode(encode(v, CodecConfig(quant="int8"), rng=np.random.default_rng(1)), v.size)
    assert out.values[1:].mean() == pytest.approx(0.3, abs=0.01)
    det = decode(encode(v, CodecConfig(quant="int8")), v.size)
    assert float(det.values[1:].max()) == 0.0  # round-to-nearest is biased, by design


@settings(deadline=None)
@given(arrays(moderate_f32))
def test_fp16_relative_error(v: np.ndarray) -> None:
    frame = encode(v, CodecConfig(quant="fp16"))
    scale = struct.unpack_from("<f", frame, 16)[0]
    out = decode(frame, v.shape[0]).to_dense().astype(np.float64)
    bound = np.abs(v.astype(np.float64)) * 2.0**-11 + scale * 2.0**-24
    assert np.all(np.abs(out - v) <= bound * (1 + 1e-6))


def test_int8_extreme_values_stay_finite() -> None:
    big = float(np.finfo(np.float32).max)
    v = np.array([big, -big, 1.0, 0.0], dtype=np.float32)
    out = decode(encode(v, CodecConfig(quant="int8")), 4).values
    assert np.all(np.isfinite(out))
    assert out[0] == pytest.approx(big, rel=1e-6)
    tiny = np.array([1e-45, -1e-44, 0.0], dtype=np.float32)
    out = decode(encode(tiny, CodecConfig(quant="int8")), 3).values
    assert np.abs(out - tiny).max() <= float(np.finfo(np.float32).tiny)


def test_fp16_never_overflows() -> None:
    v = np.array([3e38, -1e5, 1.0, 0.0], dtype=np.float32)
    out = decode(encode(v, CodecConfig(quant="fp16")), 4).values
    assert np.all(np.isfinite(out))
    assert out[0] == pytest.approx(3e38, rel=1e-3)


@settings(deadline=None)
@given(arrays(max_size=500), st.floats(0.0001, 1.0))
def test_topk_keeps_exactly_the_k_largest(v: np.ndarray, topk: float) -> None:
    n = v.shape[0]
    k = topk_count(n, topk)
    chunk = decode(encode(v, CodecConfig(quant="none", topk=topk)), n)
    idx = np.arange(n) if chunk.indices is None else chunk.indices
    assert idx.shape[0] == k
    assert np.all(np.diff(idx) > 0)
    dropped = np.ones(n, dtype=bool)
    dropped[idx] = False
    if dropped.any():
        assert np.abs(v[idx]).min() >= np.abs(v[dropped]).max()


def test_topk_count_rounding() -> None:
    assert topk_count(100, 0.07) == 7
    assert topk_count(1_000_000, 0.01) == 10_000
    assert topk_count(10, 0.001) == 1
    assert topk_count(10, 0.0) == 10
    assert topk_count(10, 1.0) == 10


def test_explicit_count_overrides_fraction() -> None:
    v = np.arange(1, 101, dtype=np.float32)
    chunk = decode(encode(v, CodecConfig(quant="none", topk=0.5), k=3), 100)
    assert chunk.indices is not None
    assert chunk.indices.tolist() == [97, 98, 99]


@settings(deadline=None)
@given(arrays(moderate_f32), configs, st.floats(-4, 4))
def test_add_to_matches_to_dense(v: np.ndarray, cfg: CodecConfig, scale: float) -> None:
    chunk = decode(encode(v, cfg), v.shape[0])
    target = np.linspace(-1, 1, v.shape[0]).astype(np.float32)
    expected = target + np.float32(scale) * chunk.to_dense()
    chunk.add_to(target, scale)
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-30)
    if chunk.indices is not None:
        assert chunk.indices.dtype == np.int64
    assert chunk.values.dtype == np.float32


def test_add_to_rejects_wrong_target_shape() -> None:
    chunk = decode(encode(np.ones(8, np.float32), CodecConfig(topk=0.5)), 8)
    with pytest.raises(SchemaError) as err:
        chunk.add_to(np.zeros(9, np.float32))
    assert err.value.reason == "shape"


def test_decoded_chunk_repr_and_dense_identity() -> None:
    v = np.ones(4, np.float32)
    chunk = DecodedChunk(4, None, v)
    dense = chunk.to_dense()
    dense += 1  # a copy: the chunk is not changed
    assert chunk.values is v and v.tolist() == [1.0] * 4
    assert "dense" in repr(chunk)


def test_top1pct_int8_is_over_100x_smaller_than_fp32() -> None:
    v = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    frame = encode(v, CodecConfig(topk=0.01, quant="int8"))
    assert v.nbytes / len(frame) >= 100
    raw_values = encode(v, CodecConfig(topk=0.01, quant="int8", zstd_values=False))
    assert v.nbytes / len(raw_values) >= 100
    assert len(frame) < len(raw_values)  # zstd of the int8 values pays for itself in bytes


def test_zstd_values_off_stores_value_planes_raw_and_decodes_the_same() -> None:
    from schemas.codec import frame as fr

    v = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    for cfg in (CodecConfig(topk=0.01, quant="int8"), CodecConfig(topk=0.0, quant="fp16")):
        packed = encode(v, cfg)
        raw = encode(v, msgspec.structs.replace(cfg, zstd_values=False))
        head = fr.parse(raw, v.size)
        n_index = 1 + head.nlow if head.sparse else 0
        assert all(size & fr.RAW_BIT for size in head.sizes[n_index:])
        a, b = decode(packed, v.size), decode(raw, v.size)
        np.testing.assert_array_equal(a.to_dense(), b.to_dense())
