"""Properties of the update codec (schemas.codec): round trips, error bounds, strictness."""

from __future__ import annotations

import struct
import zlib

import msgspec
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.codec import (
    CodecConfig,
    DecodedChunk,
    decode,
    decode_update,
    encode,
    encode_update,
    encode_with_feedback,
    topk_count,
)
from schemas.codec import frame as fr
from schemas.errors import SchemaError

CODEC_REASONS = {"codec", "indices", "shape", "non_finite", "too_large"}

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate_f32 = st.floats(
    min_value=-1e6, max_value=1e6, width=32, allow_nan=False, allow_subnormal=False
)


def arrays(
    elements: st.SearchStrategy[float] = finite_f32, max_size: int = 300
) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=elements)


configs = st.builds(
    CodecConfig,
    topk=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.37, 1.0]),
    quant=st.sampled_from(["none", "fp16", "int8"]),
    zstd_level=st.sampled_from([-3, 1, 3]),
    error_feedback=st.booleans(),
    zstd_values=st.booleans(),
)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _frame(
    planes: list[np.ndarray],
    *,
    quant: str = "none",
    length: int = 10,
    k: int = 3,
    nlow: int = 0,
    sparse: bool = True,
    scale: float = 1.0,
    flags: int | None = None,
) -> bytes:
    """Hand-build a frame (valid header and CRC) around arbitrary planes."""
    if flags is None:
        flags = fr.FLAG_SPARSE if sparse else 0
    return fr.pack(
        quant=fr.QUANT_CODES[quant],
        flags=flags,
        nlow=nlow,
        length=length,
        k=k,
        scale=scale,
        planes=[np.ascontiguousarray(p, dtype=np.uint8) for p in planes],
        level=3,
    )


def _value_planes(vals: object) -> list[np.ndarray]:
    return fr.byte_planes(np.asarray(vals, dtype="<f4"))


def _ef(
    highs: list[int], lows: list[int] | None = None, *, length: int = 10, nlow: int = 0
) -> list[np.ndarray]:
    """Elias–Fano index streams with bit ``highs[i] + i`` set (no validity checks)."""
    k = len(highs)
    nbytes = (k + ((length - 1) >> (8 * nlow)) + 1 + 7) // 8
    bits = np.zeros(nbytes * 8, np.uint8)
    for i, h in enumerate(highs):
        bits[h + i] = 1
    planes = [np.packbits(bits, bitorder="little")]
    if nlow:
        lo = np.asarray(lows, dtype="<u4").view(np.uint8).reshape(k, 4)
        planes += [np.ascontiguousarray(lo[:, j]) for j in range(nlow)]
    return planes


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


# ------------------------------------------------------------------------------ error feedback


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 8), configs, st.booleans())
def test_error_feedback_conserves_the_sum(
    n: int, steps: int, cfg: CodecConfig, stochastic: bool
) -> None:
    cfg = msgspec.structs.replace(cfg, error_feedback=True)
    rng = np.random.default_rng(n * 31 + steps)
    residual: np.ndarray | None = None
    sent = np.zeros(n)
    total = np.zeros(n)
    for _ in range(steps):
        delta = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
        q_rng = rng if stochastic else None
        frame, residual = encode_with_feedback(delta, residual, cfg, rng=q_rng)
        sent += decode(frame, n).to_dense()
        total += delta
    assert residual is not None
    scale = np.abs(total).max() + np.abs(sent).max() + 1e-30
    np.testing.assert_allclose(sent + residual, total, rtol=0, atol=scale * 1e-5)


def test_error_feedback_off_returns_zeros_and_ignores_residual() -> None:
    cfg = CodecConfig(topk=0.1, quant="int8", error_feedback=False)
    delta = np.arange(20, dtype=np.float32)
    frame, res = encode_with_feedback(delta, np.full(20, 100.0, np.float32), cfg)
    assert not res.any() and res.dtype == np.float32
    assert frame == encode(delta, cfg)


def test_error_feedback_residual_shape_mismatch() -> None:
    with pytest.raises(SchemaError) as err:
        encode_with_feedback(np.ones(4, np.float32), np.ones(5, np.float32), CodecConfig())
    assert err.value.reason == "shape"


def test_error_feedback_does_not_mutate_inputs() -> None:
    delta = np.arange(10, dtype=np.float32)
    residual = np.ones(10, np.float32)
    encode_with_feedback(delta, residual, CodecConfig(topk=0.2))
    encode_with_feedback(delta, None, CodecConfig(topk=0.2))
    assert delta.tolist() == list(range(10)) and residual.tolist() == [1.0] * 10


# ------------------------------------------------------------------------------ shards


def test_encode_update_cuts_by_bounds_and_reassembles() -> None:
    rng = np.random.default_rng(3)
    delta = rng.standard_normal(1000).astype(np.float32)
    bounds = [0, 300, 301, 1000]
    cfg = CodecConfig(topk=0.05, quant="int8")
    frames, residual = encode_update(delta, bounds, cfg)
    assert [(s, a, b) for s, a, b, _ in frames] == [(0, 0, 300), (1, 300, 301), (2, 301, 1000)]
    assert residual.shape == delta.shape
    rebuilt = decode_update(frames, bounds, 1000)
    np.testing.assert_allclose(rebuilt + residual, delta, atol=1e-6)
    for s, a, b, frame in frames:
        assert frame == encode(delta[a:b] + 0, cfg)  # per-shard frames are independent
        assert decode(frame, b - a).values.shape[0] == topk_count(b - a, 0.05)
        assert s == bounds.index(a)


def test_encode_update_with_residual_and_feedback_off() -> None:
    delta = np.ones(10, np.float32)
    res = np.full(10, 0.5, np.float32)
    _, r1 = encode_update(delta, [0, 5, 10], CodecConfig(topk=0.2, quant="none"), res)
    assert r1.sum() == pytest.approx(15.0 - 3.0)  # 2 of 10 sent at 1.5 each
    _, r2 = encode_update(delta, [0, 10], CodecConfig(error_feedback=False), res)
    assert not r2.any()


@pytest.mark.parametrize(
    "bounds", [[], [0], [1, 10], [0, 5], [0, 5, 5, 10], [0, 11], [0, 7, 3, 10]]
)
def test_encode_update_rejects_bad_bounds(bounds: list[int]) -> None:
    with pytest.raises(SchemaError) as err:
        encode_update(np.ones(10, np.float32), bounds, CodecConfig())
    assert err.value.reason == "shape"


def test_decode_update_rejects_chunk_not_in_manifest() -> None:
    delta = np.ones(10, np.float32)
    frames, _ = encode_update(delta, [0, 5, 10], CodecConfig())
    s, a, b, f = frames[1]
    for bad in ([(s, a + 1, b, f)], [(5, a, b, f)], [(0, a, b, f)]):
        with pytest.raises(SchemaError) as err:
            decode_update(bad, [0, 5, 10], 10)
        assert err.value.reason == "shape"
    with pytest.raises(SchemaError) as err:
        decode_update(frames, [0, 4, 10], 10)
    assert err.value.reason == "shape"


# ------------------------------------------------------------------------------ encode rejects


@pytest.mark.parametrize(
    "bad",
    [
        np.ones(4, np.float64),
        np.ones(4, np.int32),
        np.ones((2, 2), np.float32),
        np.ones(0, np.float32),
        [1.0, 2.0],
    ],
)
def test_encode_rejects_wrong_dtype_or_shape(bad: object) -> None:
    with pytest.raises(SchemaError) as err:
        encode(bad, CodecConfig())  # type: ignore[arg-type]
    assert err.value.reason == "shape"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("quant", ["none", "fp16", "int8"])
def test_encode_rejects_non_finite(bad: float, quant: str) -> None:
    v = np.ones(16, np.float32)
    v[7] = bad
    with pytest.raises(SchemaError) as err:
        encode(v, CodecConfig(quant=quant, topk=0.1))  # type: ignore[arg-type]
    assert err.value.reason == "non_finite"


# ------------------------------------------------------------------------------ decode rejects


def _reason(frame: object, length: int = 10, **kw: int) -> str:
    with pytest.raises(SchemaError) as err:
        decode(frame, length, **kw)  # type: ignore[arg-type]
    assert err.value.reason in CODEC_REASONS
    return err.value.reason


def test_handmade_frame_is_valid() -> None:
    chunk = decode(_frame([*_ef([1, 3, 6]), *_value_planes([1, 2, 3])]), 10)
    assert chunk.indices is not None
    assert chunk.indices.tolist() == [1, 3, 6]
    assert chunk.values.tolist() == [1.0, 2.0, 3.0]
    ef = _ef([0, 1, 1], [7, 44, 45], length=600, nlow=1)
    chunk = decode(_frame([*ef, *_value_planes([1, 2, 3])], length=600, nlow=1), 600)
    assert chunk.indices is not None
    assert chunk.indices.tolist() == [7, 256 + 44, 256 + 45]


def test_decode_rejects_indices_out_of_range() -> None:
    # a high part beyond (length-1) >> 8*nlow, and a last index >= length in the top bucket
    assert _reason(_frame([*_ef([1, 2, 10]), *_value_planes([1, 2, 3])])) == "indices"
    ef = _ef([0, 1, 1], [1, 2, 200], length=300, nlow=1)
    assert _reason(_frame([*ef, *_value_planes([1, 2, 3])], length=300, nlow=1), 300) == "indices"


def test_decode_rejects_duplicate_indices() -> None:
    ef = _ef([0, 1, 1], [7, 44, 44], length=600, nlow=1)
    frame = _frame([*ef, *_value_planes([1, 2, 3])], length=600, nlow=1)
    assert _reason(frame, 600) == "indices"
    assert _reason(_frame([*_ef([1, 1, 3]), *_value_planes([1, 2, 3])])) == "indices"


def test_decode_rejects_unsorted_indices() -> None:
    ef = _ef([0, 1, 1], [7, 50, 40], length=600, nlow=1)
    assert _reason(_frame([*ef, *_value_planes([1, 2, 3])], length=600, nlow=1), 600) == "indices"


def test_decode_rejects_wrong_number_of_set_bits() -> None:
    bits = _ef([1, 3, 6])[0].copy()
    more = bits.copy()
    more[1] |= 0x80  # bit 15: a fourth set bit
    assert _reason(_frame([more, *_value_planes([1, 2, 3])])) == "indices"
    fewer = np.zeros_like(bits)
    fewer[0] = 0b10  # only one set bit
    assert _reason(_frame([fewer, *_value_planes([1, 2, 3])])) == "indices"


def test_decode_rejects_index_streams_of_the_wrong_size() -> None:
    bits = _ef([1, 3, 6])[0]
    longer = np.concatenate([bits, np.zeros(1, np.uint8)])
    assert _reason(_frame([longer, *_value_planes([1, 2, 3])])) == "codec"
    ef = _ef([0, 1, 1], [7, 44, 45], length=600, nlow=1)
    short_low = [ef[0], ef[1][:2]]
    assert _reason(_frame([*short_low, *_value_planes([1, 2, 3])], length=600, nlow=1), 600) == (
        "codec"
    )


def test_decode_rejects_wide_indices_past_length() -> None:
    n = 2**32 - 1
    ef = _ef([255, 255, 255], [0xFFFFFD, 0xFFFFFE, 0xFFFFFF], length=n, nlow=3)
    assert _reason(_frame([*ef, *_value_planes([1, 2, 3])], length=n, nlow=3), n) == "indices"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_decode_rejects_non_finite_values(bad: float) -> None:
    assert _reason(_frame([*_ef([1, 2, 3]), *_value_planes([1, bad, 3])])) == "non_finite"
    half = fr.byte_planes(np.array([1, bad, 3], dtype="<f2"))
    frame = _frame([*_ef([1, 2, 3]), *half], quant="fp16")
    assert _reason(frame) == "non_finite"


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 3e38])
def test_decode_rejects_bad_int8_scale(scale: float) -> None:
    q = np.array([1, 127, 3], np.int8).view(np.uint8)
    frame = _frame([*_ef([1, 2, 3]), q], quant="int8", scale=scale)
    assert _reason(frame) in {"non_finite", "codec"}


def test_decode_rejects_int8_minus_128() -> None:
    q = np.array([1, -128, 3], np.int8).view(np.uint8)
    assert _reason(_frame([*_ef([1, 2, 3]), q], quant="int8")) == "codec"


def test_decode_rejects_wrong_length() -> None:
    frame = encode(np.ones(10, np.float32), CodecConfig(topk=0.3))
    assert _reason(frame, 11) == "shape"
    assert _reason(frame, 0) == "shape"
    assert _reason(frame, True) == "shape"
    assert _reason(frame, "10") == "shape"  # type: ignore[arg-type]


def test_decode_rejects_bad_k() -> None:
    vals = _value_planes(np.ones(11))
    assert _reason(_frame([np.ones(3, np.uint8), *vals], k=11)) == "shape"
    dense = _value_planes(np.ones(3))
    assert _reason(_frame(dense, sparse=False, k=3)) == "shape"  # dense frame: k == length


def test_decode_rejects_non_bytes_and_oversize() -> None:
    assert _reason(None) == "codec"
    assert _reason("abc") == "codec"
    frame = encode(np.ones(10, np.float32), CodecConfig())
    assert _reason(frame, max_frame_bytes=len(frame) - 1) == "too_large"
    assert _reason(frame, max_decoded_bytes=9) == "too_large"
    assert decode(bytearray(frame), 10).values.tolist() == [1.0] * 10
    assert decode(memoryview(frame), 10).values.tolist() == [1.0] * 10


def test_decode_rejects_header_damage() -> None:
    frame = encode(np.ones(10, np.float32), CodecConfig(topk=0.3))
    assert _reason(b"") == "codec"
    assert _reason(b"XXXX" + frame[4:]) == "codec"
    assert _reason(frame + b"\0") == "codec"
    assert _reason(frame[:-1]) == "codec"
    for pos in range(fr.MIN_FRAME):
        damaged = bytearray(frame)
        damaged[pos] ^= 0x10
        assert _reason(bytes(damaged)) == "codec"  # CRC catches every header bit


def _reheader(frame: bytes, **fields: int) -> bytes:
    """Rewrite header fields and fix the CRC (so the deeper checks are exercised)."""
    names = ["magic", "version", "quant", "flags", "nlow", "length", "k", "scale"]
    head = dict(zip(names, struct.unpack_from("<4sBBBBIIf", frame), strict=True))
    n_index = 1 + head["nlow"] if head["flags"] & fr.FLAG_SPARSE else 0
    n = n_index + fr.QUANT_ITEMSIZE[head["quant"]]
    sizes = frame[fr.HEAD_SIZE : fr.HEAD_SIZE + 4 * n]
    body = frame[fr.HEAD_SIZE + 4 * n + 4 :]
    head.update(fields)
    raw = struct.pack("<4sBBBBIIf", *head.values()) + sizes
    return raw + struct.pack("<I", zlib.crc32(raw)) + body


@pytest.mark.parametrize(
    "fields",
    [
        {"version": 1},
        {"version": 3},
        {"quant": 3},
        {"flags": 0x80},
        {"flags": 0},
        {"nlow": 4},
        {"magic": 0},
    ],
)
def test_decode_rejects_bad_header_fields(fields: dict[str, int]) -> None:
    frame = encode(np.arange(10, dtype=np.float32), CodecConfig(topk=0.3))
    if "magic" in fields:
        frame = b"FFUD" + frame[4:]
        fields = {}
    assert _reason(_reheader(frame, **fields)) == "codec"


def test_decode_rejects_zstd_bombs() -> None:
    # A stream that declares (and holds) far more than k bytes.
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * (8 << 20))
    head = struct.pack("<4sBBBBIIf", fr.MAGIC, fr.FORMAT_VERSION, 2, 0, 0, 10, 10, 1.0)
    head += struct.pack("<I", len(bomb))
    frame = head + struct.pack("<I", zlib.crc32(head)) + bomb
    assert _reason(frame) == "codec"
    # A stream without a declared content size.
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    nosize = stream.compress(b"\0" * 10) + stream.flush()
    head = struct.pack("<4sBBBBIIf", fr.MAGIC, fr.FORMAT_VERSION, 2, 0, 0, 10, 10, 1.0)
    head += struct.pack("<I", len(nosize))
    assert _reason(head + struct.pack("<I", zlib.crc32(head)) + nosize) == "codec"
    # A header that asks for a huge allocation is refused before decompressing anything.
    huge = 2**32 - 1
    head = struct.pack("<4sBBBBIIf", fr.MAGIC, fr.FORMAT_VERSION, 0, 0, 0, huge, huge, 1.0)
    head += struct.pack("<4I", 9, 9, 9, 9)
    frame = head + struct.pack("<I", zlib.crc32(head)) + b"\0" * 36
    assert _reason(frame, huge) == "too_large"


def test_decode_rejects_every_truncation() -> None:
    frame = encode(np.linspace(-1, 1, 50, dtype=np.float32), CodecConfig(topk=0.2))
    for cut in range(len(frame)):
        assert _reason(frame[:cut], 50) == "codec"


@settings(max_examples=300, deadline=None)
@given(st.data(), configs)
def test_decode_bit_flips_raise_schema_error_or_decode_cleanly(
    data: st.DataObject, cfg: CodecConfig
) -> None:
    v = np.linspace(-3, 3, 64, dtype=np.float32)
    frame = bytearray(encode(v, cfg))
    pos = data.draw(st.integers(0, len(frame) - 1))
    frame[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        chunk = decode(bytes(frame), 64)
    except SchemaError as exc:
        assert exc.reason in CODEC_REASONS
    else:
        _assert_valid(chunk, 64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 1000))
def test_decode_random_bytes_raise_schema_error(data: bytes, length: int) -> None:
    for frame in (data, fr.MAGIC + bytes([fr.FORMAT_VERSION]) + data):
        try:
            chunk = decode(frame, length)
        except SchemaError as exc:
            assert exc.reason in CODEC_REASONS
        else:
            _assert_valid(chunk, length)


def _assert_valid(chunk: DecodedChunk, length: int) -> None:
    assert chunk.length == length
    assert chunk.values.dtype == np.float32
    assert np.all(np.isfinite(chunk.values))
    if chunk.indices is None:
        assert chunk.values.shape == (length,)
    else:
        assert chunk.indices.shape == chunk.values.shape
        assert np.all(np.diff(chunk.indices) > 0)
        assert 0 <= chunk.indices[0] and chunk.indices[-1] < length
