"""Sharded asynchronous aggregators (see ``docs/aggregator.md``).

* ``aggregator.strategies`` — pure rules (FedAsync, FedAsync-delta, FedBuff, FedAvg,
  wrappers) behind one :class:`~aggregator.strategies.Strategy` interface;
* ``aggregator.shard`` — pure per-partition state machine (validate, dedupe, apply);
* ``aggregator.worker`` — :class:`AggregatorWorker`, the Kafka shell;
* ``aggregator.settings`` — :class:`AggregatorSettings`.

``AggregatorWorker``/``AggregatorSettings`` are importable from here lazily, so importing
the pure strategies does not pull in the Kafka client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.settings import AggregatorSettings
    from aggregator.worker import AggregatorWorker

__all__ = ["AggregatorSettings", "AggregatorWorker"]


def __getattr__(name: str) -> Any:
    if name == "AggregatorSettings":
        from aggregator.settings import AggregatorSettings

        return AggregatorSettings
    if name == "AggregatorWorker":
        from aggregator.worker import AggregatorWorker

        return AggregatorWorker
    raise AttributeError(name)
