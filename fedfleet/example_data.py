"""``fedfleet data example``: scikit-learn's bundled tabular data sets written out as one
CSV per device (raw features, string class names, non-IID over labels), a central held-out
CSV to score the trained model with, and a job body that trains on them.

Nothing is downloaded: ``wine``, ``breast_cancer`` and ``iris`` ship inside scikit-learn.
This is what the walkthrough "your CSVs on your fleet" (docs/csv-walkthrough.md) starts
from; with your own CSVs you skip it.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.data import partition_dirichlet
from schemas.errors import FedfleetError

DATASETS = ("wine", "breast_cancer", "iris")


class ExampleDataError(FedfleetError):
    code = "example_data"


@dataclass(frozen=True, slots=True)
class Table:
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.int64]
    feature_names: list[str]
    class_names: list[str]


def load_table(name: str) -> Table:
    """One of scikit-learn's bundled tabular data sets (no download)."""
    from sklearn import datasets

    loaders = {
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ExampleDataError("", f"unknown data set {name!r} (one of {', '.join(DATASETS)})")
    d: Any = loaders[name]()
    feats = [str(f).replace(" ", "_").replace("(", "").replace(")", "") for f in d.feature_names]
    return Table(
        np.asarray(d.data, dtype=np.float64),
        np.asarray(d.target, dtype=np.int64),
        feats,
        [str(c) for c in d.target_names],
    )


def split_rows(
    y: npt.NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A stratified central held-out split: (device rows, test rows)."""
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.extend(idx[: round(len(idx) * test_fraction)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _write_csv(
    path: Path, header: list[str], x: npt.NDArray[np.float64], labels: list[str], label_col: str
) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*header, label_col])
        for row, lab in zip(x, labels, strict=True):
            w.writerow([*(f"{v:.6g}" for v in row), lab])


def write_example(
    name: str,
    out: Path,
    *,
    devices: int = 20,
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.25,
    label_col: str = "label",
    standardized: bool = False,
) -> dict[str, Any]:
    """Write ``out/dev000.csv`` ... (one per device), ``out/test.csv`` and ``out/job.json``;
    returns the job body. ``standardized`` writes features already standardised with the
    device rows' mean and std (the by-hand baseline a ``standardize`` job is measured
    against); the job body then does not ask for ``standardize``."""
    if devices < 1:
        raise ExampleDataError("", "--devices must be >= 1")
    if not 0.0 < test_fraction < 1.0:
        raise ExampleDataError("", "--test-fraction must be in (0, 1)")
    t = load_table(name)
    train, test = split_rows(t.y, test_fraction, seed)
    x = t.x
    if standardized:
        mean = x[train].mean(axis=0)
        std = x[train].std(axis=0)
        x = (x - mean) / np.where(std > 1e-8, std, 1.0)
    if len(train) < devices:
        raise ExampleDataError("", f"{name} has {len(train)} training rows for {devices} devices")
    parts = partition_dirichlet(t.y[train], devices, alpha, seed=seed, min_size=2)
    out.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(parts):
        rows = train[part]
        _write_csv(out / f"dev{k:03d}.csv", t.feature_names, x[rows],
                   [t.class_names[c] for c in t.y[rows]], label_col)  # fmt: skip
    _write_csv(out / "test.csv", t.feature_names, x[test],
               [t.class_names[c] for c in t.y[test]], label_col)  # fmt: skip
    body: dict[str, Any] = {
        "model_name": name.replace("_", "-"),
        "spec": {"family": "softmax", "n_features": len(t.feature_names),
                 "n_classes": len(t.class_names), "labels": t.class_names},
        "standardize": not standardized,
        "train": {"lr": 0.1, "local_epochs": 2, "batch_size": 16},
        "concurrency": max(1, min(10, devices // 2)),
        # half the fleet scores each evaluated version on its held-out rows; it counts
        # once three quarters of those reported
        "evaluation": {"every_versions": 5, "devices": max(1, min(50, devices // 2)),
                       "min_reports": max(1, min(50, devices // 2) * 3 // 4)},
    }  # fmt: skip
    (out / "job.json").write_text(json.dumps(body, indent=2) + "\n")
    return body


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("data", help="example data: bundled tabular sets as per-device CSVs")
    ds = p.add_subparsers(dest="data_cmd", required=True)
    ex = ds.add_parser(
        "example",
        help="write a bundled scikit-learn data set as one CSV per device, test.csv, job.json",
    )
    ex.add_argument("name", choices=DATASETS)
    ex.add_argument("--out", type=Path, required=True, help="directory to write")
    ex.add_argument("--devices", type=int, default=20)
    ex.add_argument("--alpha", type=float, default=0.5,
                    help="Dirichlet concentration over labels (smaller: more skewed)")  # fmt: skip
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--test-fraction", type=float, default=0.25)
    ex.add_argument("--label-column", default="label")
    ex.add_argument("--standardized", action="store_true",
                    help="write standardised features (the by-hand baseline)")  # fmt: skip
    ex.set_defaults(func=_example)


def _example(args: argparse.Namespace) -> int:
    body = write_example(
        args.name, args.out, devices=args.devices, alpha=args.alpha, seed=args.seed,
        test_fraction=args.test_fraction, label_col=args.label_column,
        standardized=args.standardized,
    )  # fmt: skip
    spec = body["spec"]
    print(f"wrote {args.devices} device CSVs, test.csv and job.json to {args.out} "
          f"({spec['n_features']} features, classes {', '.join(spec['labels'])})")  # fmt: skip
    return 0
