"""Build a (wrapped) strategy from a job's ``schemas.messages.StrategyConfig``.

Robust reducer, trim ratio and DP noise are per job (``StrategyConfig.robust`` /
``trim_ratio`` / ``dp_noise_multiplier``); where a job leaves one unset (``None``), the
deployment default in :class:`StrategyOptions` (from ``AggregatorSettings``) applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy.typing as npt

from aggregator.errors import ConfigError
from aggregator.strategies.adaptive import AdaptiveClip, CapSamples
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
    """Per-deployment knobs; ``robust``/``trim_ratio``/``dp_noise_multiplier`` are only the
    defaults for jobs whose ``StrategyConfig`` leaves them unset."""

    history_size: int = 16  # exact FedAsync: announced slices kept for x_tau
    # exact FedAsync: keep versions divisible by this automatically; 0 = keep only the
    # versions marked with Strategy.mark_published() (what the shards do)
    keep_every: int = 1
    robust: Robust = "mean"  # FedBuff reducer (default for jobs that leave it unset)
    trim_ratio: float = 0.1  # trimmed mean: fraction dropped per side (default)
    dp_noise_multiplier: float = 0.0  # > 0 enables Gaussian DP (default; needs clip_norm > 0)
    dp_seed: int = 0
    # refuse updates more than StrategyConfig.max_staleness versions behind (MaxStaleness).
    # Aggregator shards turn it off: the coordinator enforces the bound before it
    # acknowledges an upload, and every shard then applies what was acknowledged.
    bound_staleness: bool = True


@dataclass(frozen=True, slots=True)
class Effective:
    """The add-on values a job actually gets: its own, else the deployment default."""

    robust: Robust
    trim_ratio: float
    dp_noise_multiplier: float


def effective(cfg: StrategyConfig, options: StrategyOptions | None = None) -> Effective:
    """Resolve the job's optional robust/DP fields against the deployment defaults.

    The deployment's ``robust`` default only concerns FedBuff jobs (other rules have no
    buffer to reduce); a non-mean ``robust`` on another rule is refused by the schema.
    """
    opt = options or StrategyOptions()
    robust: Robust = cfg.robust if cfg.robust is not None else opt.robust
    return Effective(
        robust=robust if cfg.name == "fedbuff" else "mean",
        trim_ratio=cfg.trim_ratio if cfg.trim_ratio is not None else opt.trim_ratio,
        dp_noise_multiplier=(
            cfg.dp_noise_multiplier
            if cfg.dp_noise_multiplier is not None
            else opt.dp_noise_multiplier
        ),
    )


def build_strategy(
    cfg: StrategyConfig,
    params: npt.ArrayLike,
    *,
    version: int = 0,
    options: StrategyOptions | None = None,
) -> Strategy:
    """Core rule named by ``cfg.name`` wrapped as ``RejectNonFinite(MaxStaleness(
    [CapSamples](AdaptiveClip(ClipL2 | GaussianDP (core)))))`` (no ``MaxStaleness``, and
    no age limit on the FedAsync history, when ``options.bound_staleness`` is off).

    The adaptive bound (``cfg.clip_multiplier > 0``) sits outside the fixed one, so with
    both the tighter wins; ``CapSamples`` only for FedAvg (the one rule weighting by
    ``num_samples``). Under differential privacy the fixed ``clip_norm`` is the bound and
    the adaptive one is not applied: a bound learnt from other devices' updates would
    make each update's treatment depend on the others', outside the DP accounting."""
    opt = options or StrategyOptions()
    eff = effective(cfg, opt)
    core: Strategy
    if cfg.name in ("fedasync", "fedasync_delta"):
        fn = make_staleness(cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        hist = VersionHistory(
            keep_every=opt.keep_every,
            capacity=opt.history_size,
            max_age=cfg.max_staleness if opt.bound_staleness else None,
        )
        cls = FedAsync if cfg.name == "fedasync" else FedAsyncDelta  # delta ignores sparse_mix
        core = cls(
            params, alpha=cfg.alpha, staleness_fn=fn, version=version, history=hist,
            sparse_mix=cfg.sparse_mix,
        )  # fmt: skip
    elif cfg.name == "fedbuff":
        kw: dict[str, Any] = {
            "buffer_size": cfg.buffer_size,
            "server_lr": cfg.server_lr,
            "server_momentum": cfg.server_momentum,
            "version": version,
        }
        if eff.robust == "median":
            core = FedBuffMedian(params, **kw)
        elif eff.robust == "trimmed_mean":
            core = FedBuffTrimmedMean(params, trim=eff.trim_ratio, **kw)
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
    if eff.dp_noise_multiplier > 0.0:
        if cfg.clip_norm <= 0.0:
            raise ConfigError("differential privacy needs clip_norm > 0")
        s = GaussianDP(
            s,
            clip_norm=cfg.clip_norm,
            noise_multiplier=eff.dp_noise_multiplier,
            seed=opt.dp_seed,
        )
    elif cfg.clip_norm > 0.0:
        s = ClipL2(s, cfg.clip_norm)
    if cfg.clip_multiplier > 0.0 and eff.dp_noise_multiplier <= 0.0:
        s = AdaptiveClip(s, multiplier=cfg.clip_multiplier, window=cfg.clip_window)
        if cfg.name == "fedavg":
            s = CapSamples(s, multiplier=cfg.clip_multiplier, window=cfg.clip_window)
    if opt.bound_staleness:
        s = MaxStaleness(s, cfg.max_staleness)
    return RejectNonFinite(s)
