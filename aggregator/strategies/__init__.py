"""Pure aggregation strategies (no I/O): one module per rule, add-ons wrap.

Build one with :func:`build_strategy` from a job's ``StrategyConfig``.
"""

from aggregator.strategies.adaptive import AdaptiveClip, CapSamples
from aggregator.strategies.base import (
    Applied,
    Chunk,
    ChunkLike,
    SliceStrategy,
    Strategy,
    StrategyState,
    Update,
    Wrapper,
)
from aggregator.strategies.factory import StrategyOptions, build_strategy
from aggregator.strategies.fedasync import FedAsync, FedAsyncDelta
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff, FedBuffMedian, FedBuffTrimmedMean
from aggregator.strategies.history import VersionHistory
from aggregator.strategies.staleness import constant, hinge, make_staleness, polynomial
from aggregator.strategies.wrappers import ClipL2, GaussianDP, MaxStaleness, RejectNonFinite

__all__ = [
    "AdaptiveClip",
    "Applied",
    "CapSamples",
    "Chunk",
    "ChunkLike",
    "ClipL2",
    "FedAsync",
    "FedAsyncDelta",
    "FedAvg",
    "FedBuff",
    "FedBuffMedian",
    "FedBuffTrimmedMean",
    "GaussianDP",
    "MaxStaleness",
    "RejectNonFinite",
    "SliceStrategy",
    "Strategy",
    "StrategyOptions",
    "StrategyState",
    "Update",
    "VersionHistory",
    "Wrapper",
    "build_strategy",
    "constant",
    "hinge",
    "make_staleness",
    "polynomial",
]
