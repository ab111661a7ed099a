"""The root of every fedfleet error, and the typed errors of what crosses a process boundary.

Error tree (each package adds its own branch under the root)::

    FedfleetError(Exception)         .code (machine-readable, a metrics label), .detail,
    │                                .retriable (class-level flag, never set on an instance)
    ├── SchemaError(ValueError)      any malformed wire message or codec frame; .code is one
    │                                of REASONS
    ├── SettingsError(ValueError)    a setting (flag, env var, config file) has a bad value;
    │                                .code names the field
    ├── aggregator.errors.AggregatorError     (UpdateRejected, CheckpointError, ConfigError)
    ├── coordinator.errors.CoordinatorError   (UploadRejected, JobError, NotFound, ...)
    ├── edge_agent.errors.AgentError          (ModelFetchError, ModelVerifyError, ...)
    └── stack / CLI errors                    (a server cannot be started or reached, ...)

``str(err)`` is one line, ``"code: detail"``: the CLI prints it and exits 2 for any
``FedfleetError``. ``reason`` is another name for ``code`` (the word the wire and the
metrics use). Callers count rejections by code and never see a bare
``KeyError``/``msgspec.ValidationError``/``zstd.ZstdError`` from decoding.
"""

from __future__ import annotations

from typing import ClassVar, Final


class FedfleetError(Exception):
    """Base of every error fedfleet raises on purpose (see the tree above)."""

    code: str = "error"  # the class default; an instance may name a more precise code
    retriable: ClassVar[bool] = False

    def __init__(self, code: str = "", detail: str = "") -> None:
        if code:
            self.code = code
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else self.code)

    @property
    def reason(self) -> str:
        return self.code


class SettingsError(FedfleetError, ValueError):
    """A setting has a bad value; ``code`` is the field (or ``unknown`` / ``config``)."""

    code = "settings"

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


class SchemaError(FedfleetError, ValueError):
    """A wire message or codec frame was rejected.

    ``reason`` (= ``code``) is a short machine-readable code (see ``REASONS``) meant for
    metric labels.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason if reason in REASONS else "malformed", detail)
