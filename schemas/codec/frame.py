"""Frame layout of the update codec: header, byte planes, bounded zstd.

A frame is::

    header   <4sBBBBIIf  magic b"FFUC", format version, quant code, flags, index width,
                         chunk length, k (entries sent), scale (float32)
    sizes    n x <I      compressed size of each stream (n = index width + value itemsize)
    crc      <I          CRC-32 of header + sizes
    streams  n zstd frames, each holding one byte plane of k bytes

Index gaps (``idx[0]``, then ``idx[i] - idx[i-1]``) are stored as ``width`` little-endian
byte planes (plane j holds byte j of every gap); values as ``itemsize`` byte planes. Each
plane is its own zstd frame (content size and checksum written): planes have very different
statistics, and compressing them apart is ~10% smaller than one frame (measured, see
``docs/codec.md``). Nothing is decompressed before its declared size is checked against the
header, so a frame can never make the decoder allocate more than ``k * (width + itemsize)``.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

from schemas.errors import SchemaError

MAGIC: Final = b"FFUC"
FORMAT_VERSION: Final = 1
QUANT_CODES: Final = {"none": 0, "fp16": 1, "int8": 2}
QUANT_NAMES: Final = {v: k for k, v in QUANT_CODES.items()}
QUANT_ITEMSIZE: Final = {0: 4, 1: 2, 2: 1}
FLAG_SPARSE: Final = 0x01
FLAG_STOCHASTIC: Final = 0x02
KNOWN_FLAGS: Final = FLAG_SPARSE | FLAG_STOCHASTIC
MAX_INDEX_WIDTH: Final = 4
MAX_LENGTH: Final = 0xFFFFFFFF

_HEAD = struct.Struct("<4sBBBBIIf")
_U32 = struct.Struct("<I")
HEAD_SIZE: Final = _HEAD.size
MIN_FRAME: Final = HEAD_SIZE + 2 * _U32.size  # header, >= 1 stream size, crc

_local = threading.local()


@dataclass(frozen=True, slots=True)
class Header:
    """Parsed, self-consistent frame header (no payload checks yet)."""

    quant: int
    flags: int
    width: int
    length: int
    k: int
    scale: float
    sizes: tuple[int, ...]
    body_offset: int

    @property
    def sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)


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
    width: int,
    length: int,
    k: int,
    scale: float,
    planes: list[npt.NDArray[np.uint8]],
    level: int,
) -> bytes:
    """Compress ``planes`` and prepend the header; the inverse of :func:`parse` + streams."""
    cctx = _compressor(level)
    streams = [cctx.compress(p.data) for p in planes]
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, quant, flags, width, length, k, scale)
    head += b"".join(_U32.pack(len(s)) for s in streams)
    head += _U32.pack(zlib.crc32(head))
    return b"".join([head, *streams])


def parse(frame: bytes | bytearray | memoryview, expected_length: int) -> Header:
    """Validate the header of ``frame`` (magic, version, CRC, sizes, length)."""
    if len(frame) < MIN_FRAME:
        raise SchemaError("codec", f"frame of {len(frame)} bytes is shorter than a header")
    magic, version, quant, flags, width, length, k, scale = _HEAD.unpack_from(frame, 0)
    if magic != MAGIC:
        raise SchemaError("codec", "bad magic")
    if version != FORMAT_VERSION:
        raise SchemaError("codec", f"unsupported codec format version {version}")
    if quant not in QUANT_ITEMSIZE:
        raise SchemaError("codec", f"unknown quantisation code {quant}")
    if flags & ~KNOWN_FLAGS:
        raise SchemaError("codec", f"unknown flags {flags:#x}")
    sparse = bool(flags & FLAG_SPARSE)
    if sparse != (width > 0) or width > MAX_INDEX_WIDTH:
        raise SchemaError("codec", f"index width {width} inconsistent with flags {flags:#x}")
    n = width + QUANT_ITEMSIZE[quant]
    end = HEAD_SIZE + _U32.size * n
    if len(frame) < end + _U32.size:
        raise SchemaError("codec", "truncated header")
    sizes = struct.unpack_from(f"<{n}I", frame, HEAD_SIZE)
    (crc,) = _U32.unpack_from(frame, end)
    if zlib.crc32(memoryview(frame)[:end]) != crc:
        raise SchemaError("codec", "header checksum mismatch")
    body = end + _U32.size
    if body + sum(sizes) != len(frame):
        raise SchemaError("codec", "stream sizes do not add up to the frame size")
    if length != expected_length:
        raise SchemaError("shape", f"frame length {length} != expected {expected_length}")
    if k < 1 or k > length or (not sparse and k != length):
        raise SchemaError("shape", f"entry count {k} invalid for length {length}")
    return Header(quant, flags, width, length, k, float(scale), tuple(sizes), body)


def read_planes(frame: bytes | bytearray | memoryview, head: Header) -> list[bytes]:
    """Decompress every stream; each must declare and hold exactly ``k`` bytes."""
    view = memoryview(frame)
    dctx = _decompressor()
    out: list[bytes] = []
    pos = head.body_offset
    for size in head.sizes:
        chunk = view[pos : pos + size]
        pos += size
        try:
            declared = zstandard.get_frame_parameters(chunk).content_size
        except zstandard.ZstdError as exc:
            raise SchemaError("codec", f"bad zstd frame: {exc}") from None
        if declared != head.k:
            raise SchemaError("codec", f"stream declares {declared} bytes, expected {head.k}")
        try:
            plane = dctx.decompress(chunk, max_output_size=head.k, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise SchemaError("codec", f"bad zstd stream: {exc}") from None
        if len(plane) != head.k:
            raise SchemaError("codec", "stream size mismatch")
        out.append(plane)
    return out


def join_planes(planes: list[bytes], dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
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
