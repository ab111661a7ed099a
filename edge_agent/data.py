"""Local datasets: CSV / ``.npz`` loaders, Dirichlet non-IID partitioning, and digits.

A ``Dataset`` is float32 features ``x[n, d]`` and the raw labels as int64 codes ``y[n]``
plus optional ``names`` (``edge_agent.labels``): without names ``y`` holds the integer
labels themselves; with names the raw label of row ``i`` is ``names[y[i]]``.
``check_dataset`` turns them into the class indices of one job's model.

CSV format: a header row; the label column is chosen by name (``label_col``, default
``label``); every other column is a feature unless ``feature_cols`` names them. Labels are
integers or strings.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataError
from edge_agent.labels import Labels, Names, parse_labels, raw_label_counts, to_classes
from schemas.types import F32


@dataclass(frozen=True, slots=True)
class Dataset:
    x: F32
    y: Labels  # integer labels, or codes into ``names``
    names: Names | None = None  # raw string labels (sorted, distinct); None: y are labels

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError("shape", f"x {self.x.shape} and y {self.y.shape} do not match")
        if not np.all(np.isfinite(self.x)):
            raise DataError("non_finite", "features contain NaN or Inf")
        if self.y.size and self.y.min() < 0:
            raise DataError("labels", "labels must be >= 0")
        if self.names is not None:
            if len(set(self.names)) != len(self.names):
                raise DataError("labels", "label names are not distinct")
            if self.y.size and self.y.max() >= len(self.names):
                raise DataError("labels", "label code outside the names")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: npt.NDArray[np.integer]) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.names)

    def label_counts(self) -> dict[str, int]:
        """Rows per raw label as the data spells it (``{"3": 12}``, ``{"setosa": 4}``)."""
        return raw_label_counts(self.y, self.names)

    @classmethod
    def none(cls) -> Dataset:
        """No rows (an agent whose data could not be loaded still runs and reports why)."""
        return cls(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))


def check_features(ds: Dataset, n_features: int) -> None:
    """``DataError("features")`` unless the rows have ``n_features`` features."""
    if ds.x.shape[1] != n_features:
        raise DataError("features", f"data has {ds.x.shape[1]} features, the job's model "
                                    f"takes {n_features}")  # fmt: skip


def check_dataset(
    ds: Dataset, *, n_features: int, n_classes: int, labels: Sequence[str] = ()
) -> Dataset:
    """Can ``ds`` train (or score) a model of this shape? A ``DataError`` says why not
    (code: ``empty``, ``features``, ``labels``) before any training starts, so a wrong job
    spec is a visible reason, never a trainer traceback. Returns the rows with ``y`` mapped
    to the model's class indices (``labels``: the job's class names, empty: integers)."""
    if len(ds) == 0:
        raise DataError("empty", "no rows to train on")
    check_features(ds, n_features)
    return Dataset(ds.x, to_classes(ds.y, ds.names, n_classes=n_classes, labels=labels))


def data_abort_reason(exc: DataError) -> str:
    """The ``TaskResponse`` reason of a data problem: ``data_<code>: <detail>``."""
    return f"data_{exc.code}: {exc.detail}"[:160]


def load_npz(path: str | Path, *, x_key: str = "x", y_key: str = "y") -> Dataset:
    """Load ``x`` (n x d) and ``y`` (n) arrays from an ``.npz`` file."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            if x_key not in z or y_key not in z:
                raise DataError("keys", f"{path} needs arrays {x_key!r} and {y_key!r}")
            x = np.asarray(z[x_key], dtype=np.float32)
            y, names = parse_labels(z[y_key])
    except DataError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise DataError("read", f"cannot read {path}: {exc}") from None
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    return Dataset(x, y, names)


def load_csv(
    path: str | Path,
    *,
    label_col: str = "label",
    feature_cols: tuple[str, ...] | list[str] = (),
) -> Dataset:
    """Load a CSV with a header row; features default to every column but ``label_col``;
    labels are integers or strings (kept raw: ``Dataset.names``)."""
    try:
        with Path(path).open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError("empty", f"{path} is empty")
            header = [h.strip() for h in header]
            if label_col not in header:
                raise DataError("columns", f"label column {label_col!r} not in {header}")
            feats = list(feature_cols) or [h for h in header if h != label_col]
            missing = [c for c in feats if c not in header]
            if missing:
                raise DataError("columns", f"feature columns {missing} not in {header}")
            fi = [header.index(c) for c in feats]
            li = header.index(label_col)
            rows_x: list[list[float]] = []
            rows_y: list[str] = []
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    rows_x.append([float(row[i]) for i in fi])
                    rows_y.append(row[li])
                except (IndexError, ValueError):
                    raise DataError("row", f"{path}:{lineno}: bad row") from None
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError("read", f"cannot read {path}: {exc}") from None
    x = np.asarray(rows_x, dtype=np.float32).reshape(len(rows_x), len(fi))
    y, names = parse_labels(np.asarray(rows_y, dtype=str))
    return Dataset(x, y, names)


def load_dataset(
    path: str | Path,
    *,
    label_col: str = "label",
    feature_cols: tuple[str, ...] | list[str] = (),
) -> Dataset:
    """Dispatch on the suffix: ``.npz`` (keys x/y, or ``label_col`` for y) or ``.csv``."""
    p = Path(path)
    if p.suffix == ".npz":
        return load_npz(p, y_key="y" if label_col == "label" else label_col)
    if p.suffix in (".csv", ".txt"):
        return load_csv(p, label_col=label_col, feature_cols=feature_cols)
    raise DataError("format", f"unsupported data file {p.name} (use .npz or .csv)")


def load_features(
    path: str | Path, *, label_col: str = "label", feature_cols: tuple[str, ...] | list[str] = ()
) -> npt.NDArray[np.float32]:
    """Rows to predict on: ``.npz`` key ``x``, or a ``.csv`` whose label column is optional
    (features default to every column but ``label_col``)."""
    p = Path(path)
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z:
                    raise DataError("keys", f"{p} needs an array 'x' (has {sorted(z.files)})")
                x = np.asarray(z["x"], dtype=np.float32)
        except DataError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise DataError("read", f"cannot read {p}: {exc}") from None
        return x.reshape(-1, 1) if x.ndim == 1 else x
    if p.suffix not in (".csv", ".txt"):
        raise DataError("format", f"unsupported input file {p.name} (use .npz or .csv)")
    try:
        with p.open(newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
    except OSError as exc:
        raise DataError("read", f"cannot read {p}: {exc}") from None
    if not header:
        raise DataError("empty", f"{p} is empty")
    if label_col in header:
        return load_csv(p, label_col=label_col, feature_cols=feature_cols).x
    feats = list(feature_cols) or header
    missing = [c for c in feats if c not in header]
    if missing:
        raise DataError("columns", f"feature columns {missing} not in {header}")
    idx = [header.index(c) for c in feats]
    rows: list[list[float]] = []
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                rows.append([float(row[i]) for i in idx])
            except (ValueError, IndexError):
                raise DataError("value", f"{p}:{lineno}: not a row of numbers") from None
    if not rows:
        raise DataError("empty", f"{p} has no rows")
    x = np.asarray(rows, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError("value", f"{p}: NaN or Inf in the features")
    return x


def _has_labels(p: Path, label_col: str) -> bool:
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return ("y" if label_col == "label" else label_col) in z.files
        if p.suffix in (".csv", ".txt"):
            with p.open(newline="") as fh:
                return label_col in [h.strip() for h in next(csv.reader(fh), [])]
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError("read", f"cannot read {p}: {exc}") from None
    return False


def load_predict_input(
    path: str | Path, *, label_col: str = "label", feature_cols: tuple[str, ...] | list[str] = ()
) -> tuple[F32, Dataset | None]:
    """Rows to predict on and, when the file holds labels (``.npz`` key ``y`` or
    ``label_col``, a ``.csv`` column ``label_col``), the labelled ``Dataset`` too."""
    p = Path(path)
    if _has_labels(p, label_col):
        ds = load_dataset(p, label_col=label_col, feature_cols=feature_cols)
        return ds.x, ds
    return load_features(p, label_col=label_col, feature_cols=feature_cols), None


def partition_dirichlet(
    y: npt.ArrayLike, n_clients: int, alpha: float, seed: int = 0, *, min_size: int = 1
) -> list[npt.NDArray[np.int64]]:
    """Split row indices into ``n_clients`` non-IID shards (per-class Dirichlet(alpha)).

    Every row is assigned exactly once. Small ``alpha`` → few classes per client. Clients are
    guaranteed at least ``min_size`` rows when there are enough rows (retries, then steals
    from the largest shard).
    """
    labels = np.asarray(y)
    if n_clients < 1 or alpha <= 0:
        raise ValueError("n_clients must be >= 1 and alpha > 0")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _attempt in range(20):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size or len(labels) < n_clients * min_size:
            break
    # Guarantee min_size by moving rows from the largest shards.
    if len(labels) >= n_clients * min_size:
        for p in parts:
            while len(p) < min_size:
                donor = max(parts, key=len)
                p.append(donor.pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def load_digits_split(test_size: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """sklearn ``load_digits`` (8x8, 10 classes) scaled to [0, 1], fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(d.target, dtype=np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset(xtr, ytr), Dataset(xte, yte)
