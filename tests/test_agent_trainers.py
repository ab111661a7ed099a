"""Numpy trainers: gradients vs finite differences, loss decreases, forward agrees."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edge_agent.data import load_digits_split
from edge_agent.errors import TrainerUnavailable
from edge_agent.trainer_factory import make_trainer
from edge_agent.trainers import NumpyTrainer, accuracy, loss_and_grad, train
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import forward, init_params, num_params

SPECS = [
    ModelSpecMsg(family="softmax", n_features=5, n_classes=3),
    ModelSpecMsg(family="mlp", n_features=5, n_classes=3, hidden=4),
]


def _data(n: int = 7, d: int = 5, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, c, size=n).astype(np.int64)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_gradient_matches_finite_differences(spec: ModelSpecMsg, mu: float) -> None:
    x, y = _data()
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.5, size=num_params(spec))
    base = rng.normal(scale=0.5, size=num_params(spec))
    _, g = loss_and_grad(spec, w, x, y, base=base, prox_mu=mu)
    eps = 1e-6
    num = np.zeros_like(w)
    for i in range(w.size):
        wp, wm = w.copy(), w.copy()
        wp[i] += eps
        wm[i] -= eps
        lp, _ = loss_and_grad(spec, wp, x, y, base=base, prox_mu=mu)
        lm, _ = loss_and_grad(spec, wm, x, y, base=base, prox_mu=mu)
        num[i] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_logits_agree_with_reference_forward(spec: ModelSpecMsg) -> None:
    x, y = _data()
    w = init_params(spec, seed=3) + np.float32(0.1)
    loss, _ = loss_and_grad(spec, w, x.astype(np.float32), y)
    logits = forward(spec, w, x.astype(np.float32)).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    ref = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean()
    assert loss == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("family,hidden,lr,epochs", [("softmax", 0, 0.5, 3), ("mlp", 16, 0.2, 5)])
def test_training_on_digits_lowers_loss_and_learns(
    family: str, hidden: int, lr: float, epochs: int
) -> None:
    tr, te = load_digits_split()
    spec = ModelSpecMsg(family=family, n_features=64, n_classes=10, hidden=hidden)  # type: ignore[arg-type]
    base = init_params(spec, seed=0)
    base_loss, _ = loss_and_grad(spec, base, tr.x, tr.y)
    params, _ = train(
        NumpyTrainer(), spec, base, tr.x, tr.y, TrainConfig(lr=lr, local_epochs=epochs)
    )
    new_loss, _ = loss_and_grad(spec, params, tr.x, tr.y)
    assert new_loss < base_loss
    assert accuracy(spec, params, te.x, te.y) > 0.85
    assert np.array_equal(base, init_params(spec, seed=0))  # base not mutated


def test_prox_term_keeps_params_closer_to_base() -> None:
    tr, _ = load_digits_split()
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    base = init_params(spec)
    free, _ = train(NumpyTrainer(), spec, base, tr.x, tr.y, TrainConfig(lr=0.5))
    prox, _ = train(NumpyTrainer(), spec, base, tr.x, tr.y, TrainConfig(lr=0.5, prox_mu=1.0))
    assert np.linalg.norm(prox - base) < np.linalg.norm(free - base)


def test_run_steps_in_slices_and_counts_samples() -> None:
    x, y = _data(n=10)
    spec = SPECS[0]
    run = NumpyTrainer().start(
        spec, init_params(spec), x.astype(np.float32), y, TrainConfig(batch_size=3, local_epochs=2)
    )
    steps = 0
    while not run.step(1):
        steps += 1
    assert steps + 1 == 8  # ceil(10/3) * 2 batches
    assert run.samples_seen == 20


def test_bad_shapes_raise_value_error() -> None:
    spec = SPECS[0]
    x, y = _data(d=4)
    with pytest.raises(ValueError):
        NumpyTrainer().start(spec, init_params(spec), x.astype(np.float32), y, TrainConfig())


def test_torch_trainer_without_torch_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if the extra were not installed
    with pytest.raises(TrainerUnavailable) as err:
        make_trainer("torch")
    assert err.value.reason == "torch_missing"
    assert isinstance(make_trainer("numpy"), NumpyTrainer)
    with pytest.raises(ValueError):
        make_trainer("jax")
