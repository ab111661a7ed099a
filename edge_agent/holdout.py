"""The local held-out split: rows an agent scores models on (``eval`` tasks), never trains on.

Rule (``AgentSettings.eval_fraction`` = f, 0 <= f < 1, default 0.2): of ``n`` local rows,
``k = floor(n * f + 0.5)`` are held out, at most ``n - 1`` (training always keeps a row) and
none when ``n < 2``. Which rows: the ``k`` rows whose index has the smallest
``splitmix64(seed(device_id) + index)``, so the split depends only on the device id and the
row count: the same on every restart and every numpy version, different across devices.
Not stratified.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.data import Dataset

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def holdout_size(n: int, fraction: float) -> int:
    """How many of ``n`` rows are held out at ``fraction`` (see the module rule)."""
    if n < 2 or fraction <= 0.0:
        return 0
    return min(n - 1, math.floor(n * fraction + 0.5))


def _splitmix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        out: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
        return out


def holdout_indices(n: int, fraction: float, device_id: str) -> npt.NDArray[np.int64]:
    """Sorted indices of the held-out rows of a device with ``n`` rows."""
    k = holdout_size(n, fraction)
    if k == 0:
        return np.zeros(0, np.int64)
    seed = int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(seed))
    chosen = np.argsort(keys, kind="stable")[:k]
    return np.sort(chosen).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Split:
    """A device's rows: ``train`` (training and ``stats`` tasks) and ``holdout`` (``eval``)."""

    train: Dataset
    holdout: Dataset


def split_holdout(ds: Dataset, fraction: float, device_id: str) -> Split:
    """``ds`` cut into training rows and the held-out rows (module rule)."""
    idx = holdout_indices(len(ds), fraction, device_id)
    if idx.size == 0:
        return Split(ds, ds.subset(np.zeros(0, np.int64)))
    mask = np.ones(len(ds), bool)
    mask[idx] = False
    return Split(ds.subset(np.flatnonzero(mask)), ds.subset(idx))
