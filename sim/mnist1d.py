"""The MNIST-1D benchmark task: its data, generated locally.

MNIST-1D (Greydanus & Kobak, 2020) draws 1-D signals of length 40 from ten digit templates
(padding, scaling, translation, correlated and i.i.d. noise, shear). The rows here come
from the ``mnist1d`` package's own generator, ``mnist1d.data.make_dataset``, with its
default transform arguments and our sample count and seed; its loader ``get_dataset``
(which downloads a pickle) is never called, so nothing touches the network.

* ``generate(n_train, n_test, seed)``: float32 ``x[n, 40]`` and int64 ``y`` as two
  ``edge_agent.data.Dataset`` (the generator's rows in its shuffled order: the first
  ``n_train`` train, the rest test). The generator draws from numpy's *global* RNG; its
  state (and ``random``'s) is restored afterwards.
* ``load_mnist1d(...)``: the same, cached as ``<cache>/mnist1d/<digest>.npz`` (atomic
  write; ``<cache>`` is ``$FEDFLEET_CACHE`` or ``~/.cache/fedfleet``), keyed by the
  generator arguments and the ``mnist1d`` version; reports the generation time.

The fleet split is the simulator's (``edge_agent.data.partition_dirichlet``, what
``sim.fleet`` uses for every task).

The model (``sim.cnn1d``) and everything torch stay out of this module.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import random
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import Dataset
from schemas.atomic import atomic_write
from schemas.errors import FedfleetError
from stack.kafka import cache_root

N_FEATURES = 40
N_CLASSES = 10
CACHE_FORMAT = 1  # bump when the cached file layout changes


class Mnist1dError(FedfleetError, ValueError):
    """Bad arguments for generating or splitting the MNIST-1D task."""

    code = "mnist1d"


@dataclass(frozen=True, slots=True)
class Mnist1d:
    train: Dataset
    test: Dataset
    args: dict[str, Any]  # the generator arguments (``get_dataset_args`` plus ours)
    digest: str  # the cache key: sha256 of the arguments and the mnist1d version
    seconds: float  # wall time of this call (generation, or reading the cache)
    cached: bool  # read from the cache (True) or generated now (False)
    path: Path | None = None  # the cache file, when caching is on


class _Args:
    """The attribute view of the arguments that ``make_dataset`` reads (``args.seed``)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.__dict__.update(args)


def _mnist1d_data() -> Any:
    try:
        return importlib.import_module("mnist1d.data")
    except ImportError:
        msg = "MNIST-1D needs the mnist1d package (pip install 'fedfleet[torch]')"
        raise Mnist1dError("mnist1d_missing", msg) from None


def dataset_args(n_train: int = 60_000, n_test: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The package's default transform arguments with our sample count and seed (JSON-able;
    the download ``url`` dropped). ``train_split`` is 1.0: we split the rows ourselves."""
    if n_train < N_CLASSES or n_test < 0:
        raise Mnist1dError("", f"need n_train >= {N_CLASSES} and n_test >= 0")
    if (n_train + n_test) % N_CLASSES:
        raise Mnist1dError("", f"n_train + n_test must be a multiple of {N_CLASSES} "
                               "(the generator makes the same count per class)")  # fmt: skip
    args: dict[str, Any] = dict(_mnist1d_data().get_dataset_args(as_dict=True))
    args.pop("url", None)
    args.update(num_samples=n_train + n_test, train_split=1.0, seed=int(seed))
    return args


def args_digest(args: dict[str, Any], n_train: int) -> str:
    payload = {"format": CACHE_FORMAT, "mnist1d": metadata.version("mnist1d"),
               "args": args, "n_train": n_train}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def generate(n_train: int = 60_000, n_test: int = 10_000, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Run ``mnist1d.data.make_dataset`` (no cache, no network): (train, test)."""
    args = dataset_args(n_train, n_test, seed)
    gen = _mnist1d_data()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = gen.make_dataset(_Args(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.ascontiguousarray(d["x"], dtype=np.float32)
    y = np.asarray(d["y"], dtype=np.int64)
    return Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:])


def default_cache_dir() -> Path:
    return cache_root() / "mnist1d"


def load_mnist1d(
    n_train: int = 60_000,
    n_test: int = 10_000,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    cache: bool = True,
) -> Mnist1d:
    """``generate`` behind a file cache (``cache_dir`` default ``default_cache_dir()``). A
    cache file that cannot be read is regenerated and replaced."""
    args = dataset_args(n_train, n_test, seed)
    digest = args_digest(args, n_train)
    t0 = time.perf_counter()
    path = (cache_dir or default_cache_dir()) / f"{digest}.npz" if cache else None
    if path is not None and path.exists():
        got = _read_cache(path, n_train, n_test)
        if got is not None:
            return Mnist1d(*got, args, digest, time.perf_counter() - t0, True, path)
    train, test = generate(n_train, n_test, seed)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, x_train=train.x, y_train=train.y, x_test=test.x, y_test=test.y,
                 args=np.asarray(json.dumps(args, sort_keys=True)))  # fmt: skip
        atomic_write(path, buf.getvalue())
    return Mnist1d(train, test, args, digest, time.perf_counter() - t0, False, path)


def _read_cache(path: Path, n_train: int, n_test: int) -> tuple[Dataset, Dataset] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            train, test = (
                Dataset(np.asarray(z[f"x_{s}"], np.float32), np.asarray(z[f"y_{s}"], np.int64))
                for s in ("train", "test")
            )
    except (OSError, ValueError, KeyError, EOFError, FedfleetError):
        return None
    ok = len(train) == n_train and len(test) == n_test and train.x.shape[1] == N_FEATURES
    return (train, test) if ok else None
