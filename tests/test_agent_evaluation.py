"""Eval and stats math (``edge_agent.evaluation``) against tiny independent references."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from edge_agent.data import Dataset
from edge_agent.errors import Aborted, DataError
from edge_agent.evaluation import eval_report, feature_stats, score, stats_report
from edge_agent.models import VerifiedModel
from schemas.messages import EvalReport, ModelManifest, ModelSpecMsg, StatsReport, Task, decode
from schemas.messages import encode as wire
from schemas.modelspec import num_params

SPEC = ModelSpecMsg(family="softmax", n_features=2, n_classes=3)
# W[2, 3] then b[3]
PARAMS = np.array([1.0, 0.0, -1.0, 0.5, 2.0, 0.0, 0.1, 0.2, 0.3], np.float32)
X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], np.float32)
Y = np.array([0, 2, 1], np.int64)


def _task(kind: str = "eval") -> Task:
    now = time.time()
    return Task(task_id="t1", job_id="job-1", device_id="d1", model_name="m", upload_token="tok",
                issued_ts=now, deadline_ts=now + 60, task_kind=kind)  # type: ignore[arg-type]  # fmt: skip


def _model(spec: ModelSpecMsg, params: np.ndarray, version: int = 4) -> VerifiedModel:
    n = num_params(spec)
    manifest = ModelManifest(model_name="m", job_id="job-1", version=version,
                             shard_versions=[version], shard_bounds=[0, n], spec=spec,
                             digest="0" * 64, created_ts=time.time())  # fmt: skip
    return VerifiedModel(manifest, params.astype(np.float32))


def test_score_matches_a_hand_written_softmax() -> None:
    # Prepare: logits by hand, row by row
    w, b = PARAMS[:6].reshape(2, 3).astype(np.float64), PARAMS[6:].astype(np.float64)
    want_loss, want_pred = 0.0, []
    for x, y in zip(X.astype(np.float64), Y, strict=True):
        z = [float(x[0] * w[0, c] + x[1] * w[1, c] + b[c]) for c in range(3)]
        want_loss += math.log(sum(math.exp(v) for v in z)) - z[y]
        want_pred.append(max(range(3), key=lambda c: z[c]))
    # Execute
    got = score(SPEC, PARAMS, X, Y)
    # Assert
    assert want_pred == [0, 1, 0]  # rows 0 right, 1 and 2 wrong
    assert got.num_examples == 3 and got.correct == 1
    assert got.loss_sum == pytest.approx(want_loss, rel=1e-6)
    assert got.class_examples == [1, 1, 1] and got.class_correct == [1, 0, 0]


def test_score_is_the_same_in_chunks_and_with_standardisation_in_the_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(9000, 2)).astype(np.float32)
    y = rng.integers(0, 3, 9000)
    mean, std = (3.0, 3.0), (2.0, 2.0)
    spec = ModelSpecMsg(family="softmax", n_features=2, n_classes=3, input_mean=mean,
                        input_std=std)  # fmt: skip
    raw = score(spec, PARAMS, x, y)  # raw features, standardised inside the model
    by_hand = score(SPEC, PARAMS, ((x - 3.0) / 2.0).astype(np.float32), y)
    assert raw.correct == by_hand.correct and raw.class_correct == by_hand.class_correct
    assert raw.loss_sum == pytest.approx(by_hand.loss_sum, rel=1e-5)
    assert sum(raw.class_examples) == 9000


def test_eval_report_maps_string_labels_and_reports_the_version_scored() -> None:
    spec = ModelSpecMsg(family="softmax", n_features=2, n_classes=3, labels=("a", "b", "c"))
    holdout = Dataset(X, np.array([0, 2, 1], np.int64), ("a", "b", "c"))  # raw a, c, b
    report = eval_report(_task(), _model(spec, PARAMS, version=7), holdout, "d1")
    assert report.model_version == 7 and report.upload_token == "tok"
    assert report.correct == 1 and report.class_examples == [1, 1, 1]
    assert decode(wire(report), EvalReport) == report  # valid on the wire


def test_eval_report_of_an_empty_holdout_is_zero_not_an_abort() -> None:
    empty = Dataset(np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    report = eval_report(_task(), _model(SPEC, PARAMS), empty, "d1")
    assert (report.num_examples, report.correct, report.loss_sum) == (0, 0, 0.0)
    assert report.class_examples == [0, 0, 0] == report.class_correct
    decode(wire(report), EvalReport)


@pytest.mark.parametrize(
    ("holdout", "code"),
    [
        (Dataset(np.zeros((2, 5), np.float32), np.zeros(2, np.int64)), "features"),
        (Dataset(X, np.array([0, 1, 3], np.int64)), "labels"),
        (Dataset(X, np.array([0, 1, 0], np.int64), ("a", "z")), "labels"),
    ],
)
def test_eval_on_data_that_does_not_fit_the_job_is_a_typed_data_error(
    holdout: Dataset, code: str
) -> None:
    with pytest.raises(DataError) as e:
        eval_report(_task(), _model(SPEC, PARAMS), holdout, "d1")
    assert e.value.code == code


def test_a_diverged_model_aborts_instead_of_sending_inf() -> None:
    huge = np.full(num_params(SPEC), 3e38, np.float32)
    with pytest.raises(Aborted) as e:
        score(SPEC, huge, X * 1e3, Y)
    assert e.value.reason == "diverged"


def test_feature_stats_are_float64_sums() -> None:
    x = np.array([[1.5, -2.0], [2.5, 4.0], [1e7, 0.5]], np.float32)
    total, squares = feature_stats(x)
    assert total == [1.5 + 2.5 + 1e7, -2.0 + 4.0 + 0.5]
    assert squares == [1.5**2 + 2.5**2 + 1e14, 4.0 + 16.0 + 0.25]


def test_stats_report_counts_raw_labels_and_does_not_refuse_unknown_ones() -> None:
    rows = Dataset(X, np.array([0, 1, 1], np.int64), ("setosa", "zebra"))
    report = stats_report(_task("stats"), SPEC, rows, "d1")
    assert report.num_rows == 3 and report.label_counts == {"setosa": 1, "zebra": 2}
    assert report.feature_sum == [3.0, 0.0] and report.feature_sumsq == [5.0, 2.0]
    assert decode(wire(report), StatsReport) == report
    ints = stats_report(_task("stats"), SPEC, Dataset(X, np.array([3, 0, 3])), "d1")
    assert ints.label_counts == {"0": 1, "3": 2}  # 3 is outside the 3 classes: reported


@pytest.mark.parametrize(
    ("rows", "code"),
    [
        (Dataset(np.zeros((2, 4), np.float32), np.zeros(2, np.int64)), "features"),
        (Dataset.none(), "empty"),
        (Dataset(X, np.zeros(3, np.int64), ("x" * 300,)), "labels"),
    ],
)
def test_stats_refuses_what_the_wire_or_the_job_cannot_take(rows: Dataset, code: str) -> None:
    with pytest.raises(DataError) as e:
        stats_report(_task("stats"), SPEC, rows, "d1")
    assert e.value.code == code
