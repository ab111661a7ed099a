"""Input standardisation inside the model: numpy forward, trainers, accuracy and the ONNX
graph all take raw features and agree."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.trainers import NumpyTrainer, accuracy, loss_and_grad, train
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import forward, init_params, num_params, standardize
from schemas.onnx_export import export

RNG = np.random.default_rng(3)
MEAN = (10.0, -5.0, 0.5, 100.0)
STD = (2.0, 0.5, 1.0, 30.0)
X = (RNG.normal(size=(50, 4)) * STD + MEAN).astype(np.float32)
Y = (X[:, 0] > 10.0).astype(np.int64) + (X[:, 3] > 100.0).astype(np.int64)


def _specs(family: str) -> tuple[ModelSpecMsg, ModelSpecMsg]:
    hidden = 5 if family == "mlp" else 0
    raw = ModelSpecMsg(family=family, n_features=4, n_classes=3, hidden=hidden)  # type: ignore[arg-type]
    std = ModelSpecMsg(family=family, n_features=4, n_classes=3, hidden=hidden,  # type: ignore[arg-type]
                       input_mean=MEAN, input_std=STD)  # fmt: skip
    return raw, std


def _params(spec: ModelSpecMsg) -> np.ndarray:
    return RNG.normal(size=num_params(spec)).astype(np.float32)


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_forward_standardises_raw_features(family: str) -> None:
    raw, std = _specs(family)
    p = _params(raw)
    by_hand = ((X - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).astype(np.float32)
    np.testing.assert_array_equal(forward(std, p, X), forward(raw, p, by_hand))
    assert standardize(raw, X) is X  # no standardisation: untouched


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_onnx_on_raw_features_equals_the_agents_forward(family: str) -> None:
    _, std = _specs(family)
    p = _params(std)
    sess = ort.InferenceSession(export(std, p), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(None, {"x": X})
    np.testing.assert_allclose(logits, forward(std, p, X), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_training_on_raw_features_equals_training_on_standardised_ones(family: str) -> None:
    raw, std = _specs(family)
    base = init_params(raw, seed=1)
    by_hand = ((X - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).astype(np.float32)
    cfg = TrainConfig(lr=0.3, local_epochs=3, batch_size=8)
    got, got_loss = train(NumpyTrainer(), std, base, X, Y, cfg, seed=5)
    want, want_loss = train(NumpyTrainer(), raw, base, by_hand, Y, cfg, seed=5)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert accuracy(std, got, X, Y) == accuracy(raw, want, by_hand, Y)
    l1, g1 = loss_and_grad(std, base.astype(np.float64), X.astype(np.float64), Y)
    l2, g2 = loss_and_grad(raw, base.astype(np.float64), by_hand.astype(np.float64), Y)
    assert l1 == pytest.approx(l2, rel=1e-6)
    np.testing.assert_allclose(g1, g2, atol=1e-6)
