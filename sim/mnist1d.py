"""The MNIST-1D benchmark task: data generated locally, a Dirichlet non-IID fleet split.

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
* ``dirichlet_partition(y, devices, alpha, ...)``: per class, Dirichlet(alpha) shares over
  the devices; then devices below ``min_rows`` take random rows from the largest device.
  ``label_skew`` measures the result.
* ``write_device_csvs(...)``: one CSV per device (and ``test.csv``) in the format of
  ``fedfleet data example``: a header of feature names plus ``label``, one row per example.

The model (``sim.cnn1d``) and everything torch stay out of this module.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.data import Dataset
from schemas.atomic import atomic_write
from schemas.errors import FedfleetError
from stack.kafka import cache_root

N_FEATURES = 40
N_CLASSES = 10
CACHE_FORMAT = 1  # bump when the cached file layout changes
I64 = npt.NDArray[np.int64]


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


# ------------------------------------------------------------------ the fleet split


def dirichlet_partition(
    y: npt.ArrayLike, devices: int, alpha: float, *, seed: int = 0, min_rows: int = 1
) -> list[I64]:
    """Row indices of ``devices`` non-IID shards (sorted int64 arrays; every row exactly
    once). Per class, the rows are shuffled and cut by Dirichlet(alpha) shares over the
    devices (small ``alpha``: each device holds few classes, sizes vary a lot). A device
    left below ``min_rows`` then takes random rows from the current largest device (which
    keeps at least ``min_rows``), so it inherits that device's label mix. Deterministic
    per ``seed``; pure numpy."""
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise Mnist1dError("", f"labels must be one column, got shape {labels.shape}")
    if devices < 1 or not (np.isfinite(alpha) and alpha > 0) or min_rows < 0:
        raise Mnist1dError("", "need devices >= 1, a finite alpha > 0 and min_rows >= 0")
    if len(labels) < devices * min_rows:
        raise Mnist1dError("", f"{len(labels)} rows cannot give {devices} devices "
                               f"{min_rows} rows each")  # fmt: skip
    rng = np.random.default_rng(seed)
    owner = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(devices, float(alpha)))
        cuts = np.minimum((np.cumsum(shares) * len(idx)).astype(np.int64), len(idx))
        counts = np.diff(np.concatenate(([0], cuts[:-1], [len(idx)])))
        owner[idx] = np.repeat(np.arange(devices), counts)
    _top_up(owner, devices, min_rows, rng)
    order = np.argsort(owner, kind="stable")  # ascending rows within each device
    sizes = np.bincount(owner, minlength=devices)
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _top_up(owner: I64, devices: int, min_rows: int, rng: np.random.Generator) -> None:
    sizes = np.bincount(owner, minlength=devices)
    for d in np.flatnonzero(sizes < min_rows):
        while sizes[d] < min_rows:
            donor = int(np.argmax(sizes))  # holds > min_rows while anyone is short
            take = int(min(min_rows - sizes[d], sizes[donor] - min_rows))
            pick = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[pick] = d
            sizes[donor] -= take
            sizes[d] += take


def label_skew(y: npt.ArrayLike, parts: Sequence[npt.NDArray[np.integer]]) -> float:
    """Mean over devices (with rows) of the total-variation distance between the device's
    label distribution and the whole set's: 0 for IID shards, near 1 for one class each."""
    labels = np.asarray(y)
    classes, codes = np.unique(labels, return_inverse=True)
    glob = np.bincount(codes, minlength=len(classes)) / max(len(labels), 1)
    tv = [0.5 * float(np.abs(np.bincount(codes[p], minlength=len(classes)) / len(p) - glob).sum())
          for p in parts if len(p)]  # fmt: skip
    return float(np.mean(tv)) if tv else 0.0


# ------------------------------------------------------------------ CSV files


def feature_names(n: int = N_FEATURES) -> list[str]:
    return [f"x{j:02d}" for j in range(n)]


def device_csv_name(k: int, devices: int) -> str:
    """``dev000.csv`` ... (as ``fedfleet data example``), wider past 1,000 devices so that
    sorted file names stay in device order."""
    return f"dev{k:0{max(3, len(str(devices - 1)))}d}.csv"


def write_csv(path: Path, ds: Dataset, *, label_col: str = "label", digits: int = 9) -> None:
    """One CSV: header ``x00..x39,label``, ``digits`` significant digits (9 round-trips
    float32 exactly), integer labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = f"{{:.{digits}g}}"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*feature_names(ds.x.shape[1]), label_col])
        for row, lab in zip(ds.x.tolist(), ds.y.tolist(), strict=True):
            w.writerow([*(fmt.format(v) for v in row), lab])


def write_device_csvs(
    out: Path,
    data: Dataset,
    parts: Sequence[npt.NDArray[np.integer]],
    *,
    test: Dataset | None = None,
    label_col: str = "label",
    digits: int = 9,
) -> list[Path]:
    """``out/dev000.csv`` ... (rows ``data[parts[k]]``) and, with ``test``, ``out/test.csv``;
    returns the device files in device order."""
    paths = [out / device_csv_name(k, len(parts)) for k in range(len(parts))]
    for path, part in zip(paths, parts, strict=True):
        write_csv(path, data.subset(np.asarray(part)), label_col=label_col, digits=digits)
    if test is not None:
        write_csv(out / "test.csv", test, label_col=label_col, digits=digits)
    return paths
