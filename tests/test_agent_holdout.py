"""The local held-out split (``edge_agent.holdout``): size rule, determinism, disjointness."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.data import Dataset
from edge_agent.holdout import holdout_indices, holdout_size, split_holdout


@pytest.mark.parametrize(
    ("n", "f", "k"),
    [(0, 0.2, 0), (1, 0.5, 0), (2, 0.2, 0), (3, 0.2, 1), (2, 0.9, 1), (10, 0.2, 2),
     (10, 0.0, 0), (7, 0.5, 4), (100, 0.99, 99), (1000, 0.2, 200)],
)  # fmt: skip
def test_holdout_size_rule(n: int, f: float, k: int) -> None:
    assert holdout_size(n, f) == k


def test_split_is_deterministic_per_device_and_disjoint() -> None:
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    ds = Dataset(x, np.arange(100) % 3)
    a = split_holdout(ds, 0.2, "dev-1")
    again = split_holdout(ds, 0.2, "dev-1")  # a restart
    other = split_holdout(ds, 0.2, "dev-2")
    assert len(a.holdout) == 20 and len(a.train) == 80
    assert np.array_equal(a.holdout.x, again.holdout.x)
    assert not np.array_equal(a.holdout.x, other.holdout.x)
    rows = {tuple(r) for r in a.train.x.tolist()} | {tuple(r) for r in a.holdout.x.tolist()}
    assert len(rows) == 100  # every row exactly once
    # fixed across numpy versions too: splitmix64 of the device's seed, not numpy's RNG
    assert holdout_indices(10, 0.2, "dev-1").tolist() == [0, 1]
    assert holdout_indices(20, 0.25, "dev-2").tolist() == [0, 4, 9, 12, 17]


def test_tiny_data_keeps_its_rows_for_training_and_names_survive() -> None:
    one = Dataset(np.ones((1, 2), np.float32), np.zeros(1, np.int64), ("cat",))
    s = split_holdout(one, 0.5, "d")
    assert len(s.train) == 1 and len(s.holdout) == 0 and s.holdout.names == ("cat",)
    s0 = split_holdout(Dataset.none(), 0.2, "d")
    assert len(s0.train) == 0 == len(s0.holdout)
