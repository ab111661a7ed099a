"""Typed errors of the aggregator.

Error tree::

    AggregatorError(Exception)              base; ``retriable`` tells callers whether to retry
    ├── UpdateRejected                      one update refused; counted by ``reason``, never fatal
    │       reasons: too_stale (standalone strategies only: shards leave the bound to the
    │                coordinator), unknown_base, future_version, non_finite, shape,
    │                wrong_round, unknown_job, shard_mismatch, duplicate, plus every
    │                ``schemas.errors.REASONS`` code
    ├── CheckpointError (retriable)         a checkpoint could not be read or written
    └── ConfigError                         a strategy or settings value cannot be honoured

``UpdateRejected.reason`` is the metrics label (``fedfleet_aggregator_rejected_total``).
"""

from __future__ import annotations

from typing import ClassVar


class AggregatorError(Exception):
    """Base of all aggregator errors."""

    retriable: ClassVar[bool] = False


class UpdateRejected(AggregatorError):
    """An update was refused; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class CheckpointError(AggregatorError):
    """A checkpoint could not be loaded or stored (I/O or corrupt content)."""

    retriable: ClassVar[bool] = True


class ConfigError(AggregatorError):
    """A configuration value cannot be honoured."""
