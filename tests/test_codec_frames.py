"""Strictness of the update codec: what encode refuses, and every malformed frame decode
refuses (hand-built frames with a valid header and CRC, damage, bombs, random bytes)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import CodecConfig, DecodedChunk, decode, encode
from schemas.codec import frame as fr
from schemas.errors import SchemaError
from tests.test_codec_support import configs

CODEC_REASONS = {"codec", "indices", "shape", "non_finite", "too_large"}


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
