"""The strategy interface shared by every aggregation rule, and the update types it consumes.

A :class:`Strategy` owns one shard's slice ``params`` and its ``version`` counter and folds
:class:`Update` objects into them. It does no I/O. Variants inherit from a concrete rule;
add-ons (clipping, DP, robust checks) wrap another strategy via :class:`Wrapper`.

Updates carry a *chunk*: anything shaped like ``schemas.codec.DecodedChunk`` (see
:class:`ChunkLike`). Sparse chunks are folded in without densifying where the rule allows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from aggregator.errors import UpdateRejected
from schemas.codec.kernels import scatter_add
from schemas.types import F32

IdxArray = npt.NDArray[np.integer]


class ChunkLike(Protocol):
    """A decoded delta chunk: dense when ``indices`` is None, else sorted unique indices."""

    @property
    def indices(self) -> IdxArray | None: ...

    @property
    def values(self) -> F32: ...

    @property
    def size(self) -> int:
        """Number of values (without materialising them)."""
        ...

    @property
    def finite(self) -> bool:
        """True when the values are already known to be finite (no scan needed)."""
        ...

    def to_dense(self) -> F32: ...

    def add_to(self, target: F32, scale: float = 1.0) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class Chunk:
    """Local :class:`ChunkLike` implementation (used by wrappers and tests)."""

    length: int
    values: F32
    indices: IdxArray | None = None

    @classmethod
    def dense(cls, values: npt.ArrayLike) -> Chunk:
        v = np.ascontiguousarray(values, dtype=np.float32)
        return cls(v.size, v, None)

    @classmethod
    def sparse(cls, length: int, indices: npt.ArrayLike, values: npt.ArrayLike) -> Chunk:
        return cls(
            length,
            np.ascontiguousarray(values, dtype=np.float32),
            np.ascontiguousarray(indices, dtype=np.int64),
        )

    @property
    def size(self) -> int:
        return int(self.values.shape[0]) if self.values.ndim == 1 else -1

    @property
    def finite(self) -> bool:
        return False  # built from arbitrary arrays: RejectNonFinite scans them

    def to_dense(self) -> F32:
        if self.indices is None:
            return self.values.copy()
        out = np.zeros(self.length, dtype=np.float32)
        out[self.indices] = self.values
        return out

    def add_to(self, target: F32, scale: float = 1.0) -> None:
        if self.indices is None:
            target += np.float32(scale) * self.values
        else:
            scatter_add(target, self.indices, self.values, scale)


def add_chunk(target: F32, chunk: ChunkLike, scale: float) -> None:
    """``target += scale * chunk`` in place, touching only the chunk's coordinates.

    Delegates to the chunk (a decoded int8 chunk folds its quantised values in directly);
    every implementation rounds like ``target[idx] += np.float32(scale) * values``.
    """
    chunk.add_to(target, scale)


def rescaled(chunk: ChunkLike, length: int, factor: float) -> Chunk:
    """A copy of ``chunk`` with values multiplied by ``factor`` (sparsity kept)."""
    vals = (chunk.values * np.float32(factor)).astype(np.float32, copy=False)
    return Chunk(length, vals, chunk.indices)


def check_shape(chunk: ChunkLike, length: int) -> None:
    """Reject a chunk whose coordinates do not fit a slice of ``length`` parameters."""
    idx = chunk.indices
    n_vals = chunk.size
    if idx is None:
        if n_vals != length:
            raise UpdateRejected("shape", f"dense chunk of {n_vals} values for slice {length}")
        return
    if idx.ndim != 1 or idx.shape[0] != n_vals:
        raise UpdateRejected("shape", "indices and values differ in length")
    if n_vals and (int(idx[0]) < 0 or int(idx[-1]) >= length):
        raise UpdateRejected("shape", f"sparse index outside slice of {length}")


@dataclass(frozen=True, slots=True)
class Update:
    """One shard's part of a device update, as a strategy sees it."""

    chunk: ChunkLike
    base_version: int
    num_samples: int = 1
    update_id: str = ""


@dataclass(frozen=True, slots=True)
class Applied:
    """Result of folding one update: ``new_version`` is set when the slice changed."""

    staleness: int
    weight: float
    new_version: int | None


@dataclass(slots=True)
class StrategyState:
    """Everything needed to resume a strategy exactly (what a checkpoint stores)."""

    version: int
    params: F32
    arrays: dict[str, F32] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """One shard's aggregation rule and state."""

    name: ClassVar[str] = "strategy"

    @property
    @abstractmethod
    def params(self) -> F32:
        """The current slice (do not mutate)."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Versions produced so far (0 = initial slice)."""

    def staleness(self, base_version: int) -> int:
        """Versions this shard advanced since ``base_version``; rejects future bases."""
        if base_version > self.version:
            raise UpdateRejected(
                "future_version", f"base {base_version} > current version {self.version}"
            )
        return self.version - base_version

    @abstractmethod
    def apply(self, update: Update) -> Applied:
        """Fold one update in (or buffer it); raise :class:`UpdateRejected` to refuse it."""

    def flush(self) -> Applied | None:
        """Apply a partial buffer now (buffered rules); ``None`` when nothing changed."""
        return None

    def mark_published(self) -> None:
        """The current version is being announced: devices may now train on it, so rules
        that need their base slice (exact FedAsync) keep it. No-op by default."""
        return None

    @abstractmethod
    def get_state(self) -> StrategyState:
        """A copy of the complete state."""

    @abstractmethod
    def set_state(self, state: StrategyState) -> None:
        """Resume from a state produced by :meth:`get_state`."""


class Wrapper(Strategy):
    """Add-on around another strategy; override :meth:`admit` to check or transform."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def params(self) -> F32:
        return self.inner.params

    @property
    def version(self) -> int:
        return self.inner.version

    def staleness(self, base_version: int) -> int:
        return self.inner.staleness(base_version)

    def admit(self, update: Update) -> Update:
        return update

    def apply(self, update: Update) -> Applied:
        return self.inner.apply(self.admit(update))

    def flush(self) -> Applied | None:
        return self.inner.flush()

    def mark_published(self) -> None:
        self.inner.mark_published()

    def get_state(self) -> StrategyState:
        return self.inner.get_state()

    def set_state(self, state: StrategyState) -> None:
        self.inner.set_state(state)

    def unwrap(self) -> Strategy:
        s: Strategy = self.inner
        while isinstance(s, Wrapper):
            s = s.inner
        return s


class SliceStrategy(Strategy):
    """Concrete rules' base: holds the slice and version; subclasses add their extras."""

    def __init__(self, params: npt.ArrayLike, *, version: int = 0) -> None:
        self._params: F32 = np.array(params, dtype=np.float32, copy=True).reshape(-1)
        self._version = int(version)

    @property
    def params(self) -> F32:
        return self._params

    @property
    def version(self) -> int:
        return self._version

    def _extra_state(self, state: StrategyState) -> None:
        """Add subclass state to ``state`` (arrays are copied by the caller)."""

    def _load_extra(self, state: StrategyState) -> None:
        """Restore subclass state from ``state``."""

    def get_state(self) -> StrategyState:
        st = StrategyState(self._version, self._params.copy())
        self._extra_state(st)
        st.arrays = {k: np.array(v, dtype=np.float32, copy=True) for k, v in st.arrays.items()}
        return st

    def set_state(self, state: StrategyState) -> None:
        params = np.array(state.params, dtype=np.float32, copy=True).reshape(-1)
        if params.shape != self._params.shape:
            raise ValueError(f"state has {params.size} params, strategy {self._params.size}")
        self._params = params
        self._version = int(state.version)
        self._load_extra(state)
