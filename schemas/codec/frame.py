"""Frame layout of the update codec: header, byte planes, bounded zstd.

A frame (format version 2) is::

    header   <4sBBBBIIf  magic b"FFUC", format version, quant code, flags, low bytes,
                         chunk length, k (entries sent), scale (float32)
    sizes    n x <I      size of each stream; bit 31 set = stored raw, else one zstd frame
    crc      <I          CRC-32 of header + sizes
    streams  n streams

Sparse frames carry their indices Elias–Fano coded: stream 0 is the little-endian bitmap of
the high parts (bit ``(idx[i] >> 8*nlow) + i`` set for every i), then ``nlow`` byte planes of
the low parts (plane j = byte j of every index; ``nlow`` 0–3, chosen by the encoder to make
the index part smallest). Values follow as ``itemsize`` byte planes (plane j = byte j of
every value). Dense frames have only the value planes. Every stream decodes to a size fixed
by the header (bitmap: ``ceil((k + ((length-1) >> 8*nlow) + 1) / 8)`` bytes, planes: ``k``
bytes). A stream is zstd-compressed (content size and checksum written) unless that saves
less than 1/16 of it — 1/4 for the index streams — then it is stored raw, so the decoder
does not pay zstd for incompressible planes (low index bytes, low mantissa bytes). The
stricter index rule is a speed choice: for a scattered top-k set Elias–Fano is already
close to the entropy of the index set, so zstd shaves only ~15% off the bitmap (~2% of the
frame) for the fixed cost of one more zstd call on every decode (~5 µs, ~7% of decode +
apply at 1M parameters); index sets with runs of neighbours compress far better than 1/4
and stay compressed. ``CodecConfig.zstd_values = False`` makes the same choice for the
value planes, at a larger price in bytes (they are stored raw without trying zstd). The
decoder accepts either form for every stream. Nothing is decompressed before
its declared size is checked against the header, so a frame can never make the decoder
allocate more than its header allows.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
import zstandard

from schemas.codec.kernels import ef_bitmap_bytes
from schemas.errors import SchemaError

MAGIC: Final = b"FFUC"
FORMAT_VERSION: Final = 2
QUANT_CODES: Final = {"none": 0, "fp16": 1, "int8": 2}
QUANT_NAMES: Final = {v: k for k, v in QUANT_CODES.items()}
QUANT_ITEMSIZE: Final = {0: 4, 1: 2, 2: 1}
FLAG_SPARSE: Final = 0x01
FLAG_STOCHASTIC: Final = 0x02
KNOWN_FLAGS: Final = FLAG_SPARSE | FLAG_STOCHASTIC
MAX_LOW_BYTES: Final = 3
RAW_BIT: Final = 0x80000000
MAX_LENGTH: Final = 0xFFFFFFFF

_HEAD = struct.Struct("<4sBBBBIIf")
_U32 = struct.Struct("<I")
# the stream-size table and the CRC after it, read in one unpack per stream count
_SIZES_CRC: Final = {n: struct.Struct(f"<{n + 1}I") for n in range(1, 2 + MAX_LOW_BYTES + 4)}
_SIZE_MASK: Final = ~RAW_BIT & 0xFFFFFFFF  # size field -> stream bytes
_stream_bytes: Final = _SIZE_MASK.__and__
_new_header: Final = tuple.__new__  # Header(...) without the generated __new__'s frame
HEAD_SIZE: Final = _HEAD.size
MIN_FRAME: Final = HEAD_SIZE + 2 * _U32.size  # header, >= 1 stream size, crc

_local = threading.local()


class Header(NamedTuple):
    """Parsed, self-consistent frame header (no payload checks yet)."""

    quant: int
    flags: int
    nlow: int
    length: int
    k: int
    scale: float
    sizes: tuple[int, ...]
    body_offset: int

    @property
    def sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    def stream_sizes(self) -> list[int]:
        """Decoded size of every stream, in order (fixed by the header)."""
        k = self.k
        if not self.flags & FLAG_SPARSE:
            return [k] * QUANT_ITEMSIZE[self.quant]
        bitmap = ef_bitmap_bytes(k, self.length, self.nlow)
        return [bitmap, *[k] * (self.nlow + QUANT_ITEMSIZE[self.quant])]


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True
        )
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def byte_planes(arr: npt.NDArray[np.generic]) -> list[npt.NDArray[np.uint8]]:
    """Split a little-endian 1-D array into its byte planes (plane j = byte j of each item)."""
    size = arr.dtype.itemsize
    raw = np.ascontiguousarray(arr).view(np.uint8)
    if size == 1:
        return [raw]
    mat = raw.reshape(-1, size)
    return [np.ascontiguousarray(mat[:, j]) for j in range(size)]


def pack(
    *,
    quant: int,
    flags: int,
    nlow: int,
    length: int,
    k: int,
    scale: float,
    planes: Sequence[bytes | npt.NDArray[np.uint8]],
    level: int,
    index_planes: int = 0,
    zstd_values: bool = True,
) -> bytes:
    """Compress ``planes`` and prepend the header.

    A plane is stored raw where zstd saves less than 1/16 of it, or less than 1/4 for the
    first ``index_planes`` planes (the index streams; see the module docstring). With
    ``zstd_values=False`` the value planes (all after the index streams) are stored raw
    without trying zstd.
    """
    cctx = _compressor(level)
    streams: list[bytes] = []
    sizes: list[int] = []
    for i, p in enumerate(planes):
        raw = p if isinstance(p, bytes) else p.tobytes()
        if i >= index_planes and not zstd_values:
            streams.append(raw)
            sizes.append(len(raw) | RAW_BIT)
            continue
        packed = cctx.compress(raw)
        keep = 3 if i < index_planes else 15  # raw unless packed <= keep/16 of raw
        if len(packed) * 16 > len(raw) * keep:
            streams.append(raw)
            sizes.append(len(raw) | RAW_BIT)
        else:
            streams.append(packed)
            sizes.append(len(packed))
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, quant, flags, nlow, length, k, scale)
    head += b"".join(_U32.pack(n) for n in sizes)
    head += _U32.pack(zlib.crc32(head))
    return b"".join([head, *streams])


def parse(frame: bytes | bytearray | memoryview, expected_length: int) -> Header:
    """Validate the header of ``frame`` (magic, version, CRC, sizes, length)."""
    total = len(frame)
    if total < MIN_FRAME:
        raise SchemaError("codec", f"frame of {total} bytes is shorter than a header")
    magic, version, quant, flags, nlow, length, k, scale = _HEAD.unpack_from(frame, 0)
    if magic != MAGIC:
        raise SchemaError("codec", "bad magic")
    if version != FORMAT_VERSION:
        raise SchemaError("codec", f"unsupported codec format version {version}")
    itemsize = QUANT_ITEMSIZE.get(quant)
    if itemsize is None:
        raise SchemaError("codec", f"unknown quantisation code {quant}")
    if flags & ~KNOWN_FLAGS:
        raise SchemaError("codec", f"unknown flags {flags:#x}")
    sparse = flags & FLAG_SPARSE
    if nlow > (MAX_LOW_BYTES if sparse else 0):
        raise SchemaError("codec", f"low bytes {nlow} inconsistent with flags {flags:#x}")
    n = 1 + nlow + itemsize if sparse else itemsize
    end = HEAD_SIZE + _U32.size * n
    if total < end + _U32.size:
        raise SchemaError("codec", "truncated header")
    words = _SIZES_CRC[n].unpack_from(frame, HEAD_SIZE)  # n sizes, then the CRC
    if zlib.crc32(frame[:end]) != words[n]:
        raise SchemaError("codec", "header checksum mismatch")
    sizes = words[:n]
    body = end + _U32.size
    if body + sum(map(_stream_bytes, sizes)) != total:
        raise SchemaError("codec", "stream sizes do not add up to the frame size")
    if length != expected_length:
        raise SchemaError("shape", f"frame length {length} != expected {expected_length}")
    if k < 1 or k > length or (not sparse and k != length):
        raise SchemaError("shape", f"entry count {k} invalid for length {length}")
    return _new_header(Header, (quant, flags, nlow, length, k, float(scale), sizes, body))


def read_planes(frame: bytes | bytearray | memoryview, head: Header) -> list[bytes | memoryview]:
    """Every stream, decompressed or as a view of a raw one, each exactly its fixed size."""
    view = memoryview(frame)
    dctx: zstandard.ZstdDecompressor | None = None
    out: list[bytes | memoryview] = []
    pos = head.body_offset
    for size, want in zip(head.sizes, head.stream_sizes(), strict=True):
        n = size & _SIZE_MASK
        chunk = view[pos : pos + n]
        pos += n
        if size & RAW_BIT:
            if n != want:
                raise SchemaError("codec", f"raw stream of {n} bytes, expected {want}")
            out.append(chunk)
            continue
        try:
            declared = zstandard.get_frame_parameters(chunk).content_size
        except zstandard.ZstdError as exc:
            raise SchemaError("codec", f"bad zstd frame: {exc}") from None
        if declared != want:
            raise SchemaError("codec", f"stream declares {declared} bytes, expected {want}")
        if dctx is None:
            dctx = _decompressor()
        try:
            plane = dctx.decompress(chunk, max_output_size=want, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise SchemaError("codec", f"bad zstd stream: {exc}") from None
        if len(plane) != want:
            raise SchemaError("codec", "stream size mismatch")
        out.append(plane)
    return out


def join_planes(planes: list[bytes | memoryview], dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """Inverse of :func:`byte_planes`: one array of ``dtype`` from its byte planes."""
    dt = np.dtype(dtype)
    if len(planes) == 1 and dt.itemsize == 1:
        return np.frombuffer(planes[0], dtype=dt)
    k = len(planes[0])
    mat = np.empty((k, dt.itemsize), dtype=np.uint8)
    for j, p in enumerate(planes):
        mat[:, j] = np.frombuffer(p, dtype=np.uint8)
    if len(planes) < dt.itemsize:
        mat[:, len(planes) :] = 0
    return mat.view(dt).reshape(k)
