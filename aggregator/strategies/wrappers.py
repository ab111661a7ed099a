"""Add-ons that wrap any strategy: finiteness, staleness bound, L2 clipping, Gaussian DP.

Clipping is per shard: a shard only sees its slice of the update, so the bound applies to
the slice's L2 norm (a global bound ``C`` over ``S`` shards is ``C / sqrt(S)`` per slice
if the coordinator wants the same guarantee).
"""

from __future__ import annotations

import hashlib

import numpy as np

from aggregator.errors import UpdateRejected
from aggregator.strategies.base import Chunk, Strategy, Update, Wrapper, rescaled


class RejectNonFinite(Wrapper):
    """Refuse updates whose values contain NaN or Inf (``non_finite``).

    A chunk that declares ``finite = True`` (``schemas.codec.DecodedChunk``: the strict
    decoder has already proven it, and an int8 chunk cannot hold NaN/Inf) is not scanned
    again, so its int8 values need not be dequantised here.
    """

    def admit(self, update: Update) -> Update:
        if update.chunk.finite:
            return update
        if not bool(np.isfinite(update.chunk.values).all()):
            raise UpdateRejected("non_finite", "update contains NaN or Inf")
        return update


class MaxStaleness(Wrapper):
    """Refuse updates more than ``bound`` versions behind (``too_stale``)."""

    def __init__(self, inner: Strategy, bound: int) -> None:
        super().__init__(inner)
        self.bound = bound

    def admit(self, update: Update) -> Update:
        d = self.staleness(update.base_version)
        if d > self.bound:
            raise UpdateRejected("too_stale", f"staleness {d} > bound {self.bound}")
        return update


class ClipL2(Wrapper):
    """Scale the delta down to L2 norm ``max_norm`` when it is larger."""

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        super().__init__(inner)
        if max_norm <= 0.0:
            raise ValueError("max_norm must be > 0")
        self.max_norm = max_norm

    def admit(self, update: Update) -> Update:
        norm = float(np.linalg.norm(update.chunk.values.astype(np.float64)))
        if norm <= self.max_norm:
            return update
        chunk = rescaled(update.chunk, self.params.size, self.max_norm / norm)
        return Update(chunk, update.base_version, update.num_samples, update.update_id)


class GaussianDP(Wrapper):
    """Clip to ``clip_norm`` then add N(0, (noise_multiplier * clip_norm)^2) to every
    coordinate of the slice (the delta becomes dense).

    The noise is drawn from a generator seeded by ``(seed, update_id)``, so replaying the
    same stream after a crash reproduces the same model.
    """

    def __init__(
        self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, seed: int = 0
    ) -> None:
        super().__init__(inner)
        if clip_norm <= 0.0 or noise_multiplier < 0.0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
        self._clip = ClipL2(inner, clip_norm)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed

    def noise_rng(self, update_id: str) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{update_id}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def admit(self, update: Update) -> Update:
        clipped = self._clip.admit(update)
        dense = np.array(clipped.chunk.to_dense(), dtype=np.float32, copy=True)
        sigma = self.noise_multiplier * self.clip_norm
        noise = self.noise_rng(update.update_id).normal(0.0, sigma, size=dense.size)
        dense += noise.astype(np.float32)
        return Update(Chunk.dense(dense), update.base_version, update.num_samples, update.update_id)
