"""Data loaders and non-IID partitioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import (
    check_dataset,
    load_csv,
    load_dataset,
    load_digits_split,
    load_npz,
    partition_dirichlet,
)
from edge_agent.errors import DataError


def test_csv_with_label_and_feature_columns(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b,label,c\n1,2,0,3\n4,5,1,6\n")
    ds = load_csv(p)
    assert ds.x.tolist() == [[1, 2, 3], [4, 5, 6]] and ds.y.tolist() == [0, 1]
    ds2 = load_csv(p, feature_cols=["c", "a"])
    assert ds2.x.tolist() == [[3, 1], [6, 4]]
    assert load_dataset(p).x.shape == (2, 3)


@pytest.mark.parametrize("text", ["", "a,b\n1,2\n", "a,label\nnan,0\n", "a,label\n1\n"])
def test_bad_csv_is_a_data_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(DataError):
        load_csv(p)


@pytest.mark.parametrize("label", ["x", "-1", "0.5"])
def test_labels_that_are_not_class_indices_load_raw_and_fail_at_task_start(
    tmp_path: Path, label: str
) -> None:
    p = tmp_path / "odd.csv"
    p.write_text(f"a,label\n1,{label}\n2,0\n")
    ds = load_csv(p)
    assert ds.label_counts() == {label: 1, "0": 1}
    with pytest.raises(DataError) as e:
        check_dataset(ds, n_features=1, n_classes=2)
    assert e.value.code == "labels" and repr(label) in e.value.detail


def test_npz_roundtrip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((3, 2)), y=np.array([0, 1, 2]))
    ds = load_npz(p)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 3
    np.savez(tmp_path / "k.npz", features=np.ones((3, 2)))
    with pytest.raises(DataError):
        load_npz(tmp_path / "k.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError):
        load_dataset(tmp_path / "d.parquet")


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_partition_covers_every_row_once(alpha: float) -> None:
    y = np.repeat(np.arange(10), 50)
    parts = partition_dirichlet(y, 20, alpha, seed=1)
    allidx = np.concatenate(parts)
    assert len(parts) == 20 and sorted(allidx.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 1
    again = partition_dirichlet(y, 20, alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_is_more_skewed_than_large() -> None:
    y = np.repeat(np.arange(10), 100)

    def mean_classes(alpha: float) -> float:
        parts = partition_dirichlet(y, 10, alpha, seed=0)
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    assert mean_classes(0.05) < mean_classes(100.0)


def test_digits_split_is_scaled_and_fixed() -> None:
    tr, te = load_digits_split()
    assert tr.x.shape[1] == 64 and 0.0 <= tr.x.min() and tr.x.max() <= 1.0
    tr2, _ = load_digits_split()
    assert np.array_equal(tr.y, tr2.y) and len(tr) + len(te) == 1797
