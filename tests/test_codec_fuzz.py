"""Mutation fuzzing of ``schemas.codec.decode``: every input either decodes to a valid chunk
or raises ``SchemaError`` — never another exception, never a hang.

The CI run is bounded by a case count (10,000 by default). For a longer run::

    FEDFLEET_FUZZ_CASES=1000000 FEDFLEET_FUZZ_SEED=7 .venv/bin/pytest -q tests/test_codec_fuzz.py
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zstandard

from schemas.codec import CodecConfig, DecodedChunk, decode, encode
from schemas.codec import frame as fr
from schemas.codec import kernels as kn
from schemas.errors import SchemaError

CASES = int(os.environ.get("FEDFLEET_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("FEDFLEET_FUZZ_SEED", "20261123"))
REASONS = {"codec", "indices", "shape", "non_finite", "too_large"}
HEAD = struct.Struct("<4sBBBBIIf")

Frame = tuple[bytes, int]  # (frame, expected length)
Mutator = Callable[[np.random.Generator, bytes, int], Frame]


def _corpus() -> list[Frame]:
    rng = np.random.default_rng(0)
    out: list[Frame] = []
    for n in (1, 2, 7, 64, 300, 2000):
        v = (rng.standard_normal(n) * rng.choice([1e-6, 1.0, 1e4])).astype(np.float32)
        for quant in ("none", "fp16", "int8"):
            for topk in (0.0, 0.01, 0.2):
                cfg = CodecConfig(topk=topk, quant=quant)
                out.append((encode(v, cfg), n))
        out.append((encode(v, CodecConfig(topk=0.1), rng=rng), n))
    sparse = np.zeros(70_000, np.float32)
    sparse[[0, 5, 300, 69_999]] = [1, -2, 3, -4]
    out.append((encode(sparse, CodecConfig(topk=4 / 70_000, quant="none")), 70_000))
    return out


Stream = tuple[bytes, bool]  # (stored bytes, stored raw?)


def _split(frame: bytes) -> tuple[list[object], bytes, list[Stream]] | None:
    """Header fields, the raw size table and the streams of a well-formed frame."""
    try:
        fields = list(HEAD.unpack_from(frame))
        sparse = int(fields[3]) & fr.FLAG_SPARSE
        n = (1 + int(fields[4]) if sparse else 0) + fr.QUANT_ITEMSIZE[int(fields[2])]
        sizes = struct.unpack_from(f"<{n}I", frame, fr.HEAD_SIZE)
    except (struct.error, KeyError):
        return None
    pos = fr.HEAD_SIZE + 4 * n + 4
    streams: list[Stream] = []
    for s in sizes:
        size = s & ~fr.RAW_BIT
        streams.append((frame[pos : pos + size], bool(s & fr.RAW_BIT)))
        pos += size
    return fields, frame[fr.HEAD_SIZE : fr.HEAD_SIZE + 4 * n], streams


def _join(fields: list[object], streams: list[Stream]) -> bytes:
    sizes = b"".join(struct.pack("<I", len(d) | (fr.RAW_BIT if raw else 0)) for d, raw in streams)
    head = HEAD.pack(*fields) + sizes
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(d for d, _ in streams)


def flip_bits(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    b = bytearray(f)
    for _ in range(int(rng.integers(1, 5))):
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
    return bytes(b), n


def set_byte(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    b = bytearray(f)
    values = [0, 0xFF, 0x80, 0x7F, int(rng.integers(256))]
    b[int(rng.integers(len(b)))] = values[int(rng.integers(len(values)))]
    return bytes(b), n


def truncate_or_extend(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    if rng.random() < 0.5:
        return f[: int(rng.integers(len(f)))], n
    return f + rng.bytes(int(rng.integers(1, 64))), n


def insert_delete(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    pos = int(rng.integers(len(f)))
    if rng.random() < 0.5:
        return f[:pos] + rng.bytes(int(rng.integers(1, 9))) + f[pos:], n
    return f[:pos] + f[pos + int(rng.integers(1, 9)) :], n


def header_field(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    """Rewrite one header field and fix the CRC, so decoding gets past the checksum."""
    parts = _split(f)
    if parts is None:
        return f, n
    fields, sizes, streams = parts
    i = int(rng.integers(1, 8))
    if i == 7:
        scales = [0.0, -1.0, np.inf, np.nan, 3e38, 1e-45, float(rng.random())]
        fields[i] = scales[int(rng.integers(len(scales)))]
    elif i in (5, 6):
        choices = [0, 1, 2, n - 1, n, n + 1, 2**32 - 1, int(rng.integers(2**32))]
        valid = [c for c in choices if 0 <= c < 2**32]
        fields[i] = valid[int(rng.integers(len(valid)))]
    else:
        fields[i] = int(rng.integers(0, 8)) if rng.random() < 0.8 else int(rng.integers(256))
    head = HEAD.pack(*fields) + sizes
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(d for d, _ in streams), n


def stream_content(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    """Mutate the decompressed bytes of one stream, recompress, fix sizes and CRC."""
    parts = _split(f)
    if parts is None:
        return f, n
    fields, _, streams = parts
    j = int(rng.integers(len(streams)))
    data, raw = streams[j]
    plane = bytearray(data if raw else zstandard.ZstdDecompressor().decompress(data))
    if plane and rng.random() < 0.8:
        for _ in range(int(rng.integers(1, 4))):
            plane[int(rng.integers(len(plane)))] = int(rng.integers(256))
    else:
        plane += rng.bytes(int(rng.integers(1, 4)))
    raw = rng.random() < 0.5  # re-store either way: raw and zstd streams both get mutated
    streams[j] = (bytes(plane) if raw else zstandard.ZstdCompressor(level=1).compress(plane), raw)
    return _join(fields, streams), n


def splice(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    g, m = CORPUS[int(rng.integers(len(CORPUS)))]
    cut = int(rng.integers(min(len(f), len(g))))
    return f[:cut] + g[cut:], int(rng.choice([n, m]))


def wrong_length(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    return f, int(rng.choice([max(1, n - 1), n + 1, 2 * n, 2**32 - 1]))


def random_bytes(rng: np.random.Generator, f: bytes, n: int) -> Frame:
    body = rng.bytes(int(rng.integers(0, 200)))
    return (fr.MAGIC + bytes([fr.FORMAT_VERSION]) + body if rng.random() < 0.5 else body), n


MUTATORS: list[Mutator] = [
    flip_bits,
    set_byte,
    truncate_or_extend,
    insert_delete,
    header_field,
    header_field,
    stream_content,
    stream_content,
    splice,
    wrong_length,
    random_bytes,
]
CORPUS = _corpus()


def _check(chunk: DecodedChunk, n: int) -> None:
    assert chunk.length == n
    assert chunk.values.dtype == np.float32
    assert np.isfinite(chunk.values).all()
    if chunk.indices is None:
        assert chunk.values.shape == (n,)
    else:
        assert chunk.indices.shape == chunk.values.shape
        assert 0 < chunk.indices.shape[0] <= n
        assert (np.diff(chunk.indices) > 0).all()
        assert chunk.indices[0] >= 0 and chunk.indices[-1] < n


@pytest.fixture(params=["c", "numpy"])
def codec_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Fuzz the C kernels and the pure-numpy fallback alike."""
    c_module = kn._C
    if request.param == "c" and c_module is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("the C codec kernels are not built")
        pytest.skip("C codec kernels not built")
    kn._C = c_module if request.param == "c" else None
    try:
        yield request.param
    finally:
        kn._C = c_module


@pytest.mark.timeout(600)
def test_fuzz_decode_only_raises_schema_error(codec_path: str) -> None:
    rng = np.random.default_rng(SEED)
    outcomes: Counter[str] = Counter()
    for case in range(CASES):
        frame, n = CORPUS[int(rng.integers(len(CORPUS)))]
        mutate = MUTATORS[int(rng.integers(len(MUTATORS)))]
        for _ in range(int(rng.integers(1, 3))):  # sometimes stack two mutations
            if frame:
                frame, n = mutate(rng, frame, n)
        try:
            chunk = decode(frame, n, max_decoded_bytes=1 << 24)
        except SchemaError as exc:
            assert exc.reason in REASONS, (case, exc)
            outcomes[exc.reason] += 1
        except Exception as exc:  # pragma: no cover - this is what the fuzz test looks for
            pytest.fail(f"case {case} (seed {SEED}, {mutate.__name__}): {exc!r}")
        else:
            _check(chunk, n)
            outcomes["ok"] += 1
    print(dict(outcomes))
    assert sum(outcomes.values()) == CASES
    if CASES >= 10_000:  # the mutators reach every layer of the decoder
        assert {"codec", "indices", "shape", "non_finite", "ok"} <= set(outcomes), outcomes
