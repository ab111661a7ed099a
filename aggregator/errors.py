"""Typed errors of the aggregator.

Error tree::

    FedfleetError (schemas.errors)          root: .code, .detail, class-level .retriable
    └── AggregatorError                     base of this package
        ├── UpdateRejected                  one update refused; counted by ``reason``, never fatal
        │       reasons: too_stale (standalone strategies only: shards leave the bound to the
        │                coordinator), unknown_base, future_version, non_finite, shape,
        │                wrong_round, unknown_job, shard_mismatch, duplicate,
        │                artifact_missing (an onnx job whose artifact is not on the
        │                artifacts topic, after ``artifact_wait_s``), plus every
        │                ``schemas.errors.REASONS`` code
        ├── CheckpointError (retriable)     a checkpoint could not be read or written
        └── ConfigError                     a strategy or settings value cannot be honoured

``UpdateRejected.reason`` is the metrics label (``fedfleet_aggregator_rejected_total``).
"""

from __future__ import annotations

from typing import ClassVar

from schemas.errors import FedfleetError, SettingsError


class AggregatorError(FedfleetError):
    """Base of all aggregator errors."""

    code = "aggregator"


class UpdateRejected(AggregatorError):
    """An update was refused; ``reason`` (= ``code``) is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)


class CheckpointError(AggregatorError):
    """A checkpoint could not be loaded or stored (I/O or corrupt content)."""

    code = "checkpoint"
    retriable: ClassVar[bool] = True

    def __init__(self, detail: str) -> None:
        super().__init__("", detail)


class ConfigError(AggregatorError, SettingsError):
    """A configuration value cannot be honoured (a setting, a strategy, missing topics)."""

    code = "config"

    def __init__(self, detail: str) -> None:
        super().__init__("", detail)
