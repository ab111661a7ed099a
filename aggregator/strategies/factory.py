"""Build a (wrapped) strategy from a job's ``schemas.messages.StrategyConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy.typing as npt

from aggregator.errors import ConfigError
from aggregator.strategies.base import Strategy
from aggregator.strategies.fedasync import FedAsync, FedAsyncDelta
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff, FedBuffMedian, FedBuffTrimmedMean
from aggregator.strategies.history import VersionHistory
from aggregator.strategies.staleness import make_staleness
from aggregator.strategies.wrappers import ClipL2, GaussianDP, MaxStaleness, RejectNonFinite
from schemas.messages import StrategyConfig

Robust = Literal["mean", "median", "trimmed_mean"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyOptions:
    """Knobs not (yet) carried by ``StrategyConfig``; set per aggregator deployment."""

    history_size: int = 16  # exact FedAsync: published slices kept for x_tau
    keep_every: int = 1  # exact FedAsync: keep versions divisible by this (publish cadence)
    robust: Robust = "mean"  # FedBuff reducer
    trim_ratio: float = 0.1  # trimmed mean: fraction dropped per side
    dp_noise_multiplier: float = 0.0  # > 0 enables Gaussian DP (needs clip_norm > 0)
    dp_seed: int = 0


def build_strategy(
    cfg: StrategyConfig,
    params: npt.ArrayLike,
    *,
    version: int = 0,
    options: StrategyOptions | None = None,
) -> Strategy:
    """Core rule named by ``cfg.name`` wrapped as
    ``RejectNonFinite(MaxStaleness(ClipL2 | GaussianDP (core)))``."""
    opt = options or StrategyOptions()
    core: Strategy
    if cfg.name in ("fedasync", "fedasync_delta"):
        fn = make_staleness(cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        cls = FedAsync if cfg.name == "fedasync" else FedAsyncDelta
        hist = VersionHistory(keep_every=opt.keep_every, capacity=opt.history_size)
        core = cls(params, alpha=cfg.alpha, staleness_fn=fn, version=version, history=hist)
    elif cfg.name == "fedbuff":
        kw: dict[str, Any] = {
            "buffer_size": cfg.buffer_size,
            "server_lr": cfg.server_lr,
            "server_momentum": cfg.server_momentum,
            "version": version,
        }
        if opt.robust == "median":
            core = FedBuffMedian(params, **kw)
        elif opt.robust == "trimmed_mean":
            core = FedBuffTrimmedMean(params, trim=opt.trim_ratio, **kw)
        else:
            core = FedBuff(params, **kw)
    elif cfg.name == "fedavg":
        core = FedAvg(
            params,
            buffer_size=cfg.buffer_size,
            server_lr=cfg.server_lr,
            server_momentum=cfg.server_momentum,
            version=version,
        )
    else:  # pragma: no cover - guarded by the schema Literal
        raise ConfigError(f"unknown strategy {cfg.name!r}")
    s: Strategy = core
    if opt.dp_noise_multiplier > 0.0:
        if cfg.clip_norm <= 0.0:
            raise ConfigError("differential privacy needs clip_norm > 0")
        s = GaussianDP(
            s,
            clip_norm=cfg.clip_norm,
            noise_multiplier=opt.dp_noise_multiplier,
            seed=opt.dp_seed,
        )
    elif cfg.clip_norm > 0.0:
        s = ClipL2(s, cfg.clip_norm)
    s = MaxStaleness(s, cfg.max_staleness)
    return RejectNonFinite(s)
