"""Prometheus metrics of an aggregator worker (one registry per worker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class AggregatorMetrics:
    """Counters and histograms; ``registry`` defaults to a fresh private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.applied = Counter(
            "fedfleet_aggregator_updates_applied",
            "Updates applied or buffered",
            ["shard", "strategy"],
            registry=r,
        )
        self.rejected = Counter(
            "fedfleet_aggregator_updates_rejected",
            "Updates refused, by shard and reason",
            ["shard", "reason"],
            registry=r,
        )
        self.staleness = Histogram(
            "fedfleet_aggregator_staleness",
            "Versions between an update's base and the shard",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.apply_seconds = Histogram(
            "fedfleet_aggregator_apply_seconds",
            "Decode+validate+apply time per record",
            buckets=(1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
            registry=r,
        )
        self.lag = Gauge(
            "fedfleet_aggregator_partition_lag",
            "Records behind the partition end",
            ["partition"],
            registry=r,
        )
        self.published = Counter(
            "fedfleet_aggregator_versions_published", "ShardVersion events produced", registry=r
        )
        self.checkpoints = Counter(
            "fedfleet_aggregator_checkpoints", "Checkpoints written", registry=r
        )
        self.errors = Counter(
            "fedfleet_aggregator_errors", "Recoverable errors, by kind (e.g. artifact)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "fedfleet_aggregator_checkpoint_seconds",
            "Checkpoint serialise+write time",
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests): e.g. ``value('..._rejected_total', reason='x')``."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v
