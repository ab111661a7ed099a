"""Typed errors for everything that crosses a process boundary.

Error tree::

    SchemaError(ValueError)          any malformed wire message or codec frame
        .reason   machine-readable code, one of REASONS
        .detail   human-readable text

Callers count rejections by ``reason`` (metrics label) and never see a bare
``KeyError``/``msgspec.ValidationError``/``zstd.ZstdError`` from decoding.
"""

from __future__ import annotations

from typing import Final

REASONS: Final = frozenset(
    {
        "malformed",  # not MessagePack, truncated, wrong container type
        "type",  # a field has the wrong type or a required field is missing
        "range",  # a value is outside its allowed range (battery > 100, count < 0, ...)
        "non_finite",  # NaN or Inf where a finite number is required
        "too_large",  # payload or decompressed size beyond the configured bound
        "version",  # unknown schema major version
        "kind",  # message kind does not match the expected type
        "codec",  # an update frame cannot be decoded (bad header, bad zstd, ...)
        "indices",  # sparse indices out of range, unsorted or duplicated
        "shape",  # chunk length / bounds do not match the manifest
    }
)


class SchemaError(ValueError):
    """A wire message or codec frame was rejected.

    ``reason`` is a short machine-readable code (see ``REASONS``) meant for metric labels.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            reason = "malformed"
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
