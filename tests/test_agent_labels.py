"""Raw labels (integers or strings) and their class indices for a job's model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import Dataset, check_dataset, load_csv, load_dataset, load_predict_input
from edge_agent.errors import DataError
from edge_agent.labels import class_names, parse_labels, to_classes


def test_integer_labels_stay_integers_however_spelled() -> None:
    for raw in (["0", "2", " 1 "], ["0.0", "2", "1.0"], np.array([0, 2, 1]), np.array([0.0, 2, 1])):
        codes, names = parse_labels(np.asarray(raw))
        assert codes.tolist() == [0, 2, 1] and names is None


def test_string_labels_become_sorted_names() -> None:
    codes, names = parse_labels(np.asarray(["virginica", "setosa", "virginica", "3"]))
    assert names == ("3", "setosa", "virginica") and codes.tolist() == [2, 1, 2, 0]


@pytest.mark.parametrize(
    ("names", "labels", "want"),
    [
        (None, (), [0, 2, 1]),  # integers, no class names: the integer is the class
        (None, ("0", "1", "2"), [0, 2, 1]),  # integers that are the job's class names
        (("b", "c", "a"), ("a", "b", "c"), [1, 0, 2]),  # names -> index in spec.labels
        (("0", "2", "1"), (), [0, 1, 2]),  # integer-looking names, no class names
    ],
)
def test_raw_labels_map_to_the_jobs_class_indices(
    names: tuple[str, ...] | None, labels: tuple[str, ...], want: list[int]
) -> None:
    assert to_classes(np.array([0, 2, 1]), names, n_classes=3, labels=labels).tolist() == want


@pytest.mark.parametrize(
    ("codes", "names", "labels", "bad"),
    [
        ([0, 3], None, (), "3"),  # outside n_classes
        ([0, 1], ("setosa", "zebra"), ("setosa", "versicolor", "virginica"), "'zebra'"),
        ([0], ("setosa",), (), "'setosa'"),  # a string label but the job names no classes
        ([5], None, ("a", "b", "c"), "'5'"),
    ],
)
def test_a_label_that_does_not_map_is_a_typed_error_never_an_index_error(
    codes: list[int], names: tuple[str, ...] | None, labels: tuple[str, ...], bad: str
) -> None:
    with pytest.raises(DataError) as e:
        to_classes(np.array(codes), names, n_classes=3, labels=labels)
    assert e.value.code == "labels" and bad in e.value.detail


def test_csv_with_string_labels_in_a_named_column(tmp_path: Path) -> None:
    p = tmp_path / "iris.csv"
    p.write_text("sepal,petal,species\n1,2,setosa\n3,4,virginica\n5,6,setosa\n")
    ds = load_dataset(p, label_col="species")
    assert ds.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert ds.label_counts() == {"setosa": 2, "virginica": 1}
    rows = check_dataset(ds, n_features=2, n_classes=3,
                         labels=("virginica", "setosa", "versicolor"))  # fmt: skip
    assert rows.y.tolist() == [1, 0, 1] and rows.names is None
    with pytest.raises(DataError) as e:
        load_csv(p)  # default column "label" is not there
    assert e.value.code == "columns"


def test_npz_with_string_labels(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((3, 2)), y=np.array(["cat", "dog", "cat"]))
    ds = load_dataset(p)
    assert ds.names == ("cat", "dog") and ds.y.tolist() == [0, 1, 0]


def test_predict_input_with_and_without_labels(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("a,b,kind\n1,2,x\n3,4,y\n")
    (tmp_path / "u.csv").write_text("a,b\n1,2\n3,4\n")
    x, labelled = load_predict_input(tmp_path / "l.csv", label_col="kind")
    assert x.tolist() == [[1, 2], [3, 4]] and labelled is not None
    assert labelled.label_counts() == {"x": 1, "y": 1}
    x2, none = load_predict_input(tmp_path / "u.csv", label_col="kind")
    assert x2.tolist() == [[1, 2], [3, 4]] and none is None
    np.savez(tmp_path / "x.npz", x=np.ones((2, 2)))
    assert load_predict_input(tmp_path / "x.npz")[1] is None


def test_class_names_print_names_or_indices() -> None:
    assert class_names(["a", "b"], 2) == ["a", "b"] and class_names([], 3) == ["0", "1", "2"]


def test_dataset_names_must_fit_the_codes() -> None:
    with pytest.raises(DataError):
        Dataset(np.ones((2, 1), np.float32), np.array([0, 2]), ("a", "b"))
    with pytest.raises(DataError):
        Dataset(np.ones((2, 1), np.float32), np.array([0, 1]), ("a", "a"))
