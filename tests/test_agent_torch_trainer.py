"""Optional PyTorch trainer (``fedfleet[torch]``): same gradients, same updates as numpy.

Skipped when torch is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.data import load_digits_split
from edge_agent.torch_trainer import TorchTrainer, loss_and_grad_torch  # lazy: no torch needed
from edge_agent.trainer_factory import make_trainer
from edge_agent.trainers import NumpyTrainer, loss_and_grad, train
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import init_params, num_params

pytest.importorskip("torch")  # the fedfleet[torch] extra

SPECS = [
    ModelSpecMsg(family="softmax", n_features=64, n_classes=10),
    ModelSpecMsg(family="mlp", n_features=64, n_classes=10, hidden=16),
    # standardisation inside the model: both trainers take raw features
    ModelSpecMsg(
        family="mlp",
        n_features=64,
        n_classes=10,
        hidden=16,
        input_mean=(0.3,) * 64,
        input_std=(0.4,) * 64,
    ),
]


def _id(spec: ModelSpecMsg) -> str:
    return spec.family + ("-standardized" if spec.input_mean else "")


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_autograd_gradient_equals_numpy_gradient(spec: ModelSpecMsg, mu: float) -> None:
    tr, _ = load_digits_split()
    rng = np.random.default_rng(2)
    w = rng.normal(scale=0.1, size=num_params(spec))
    base = rng.normal(scale=0.1, size=num_params(spec))
    x, y = tr.x[:40].astype(np.float64), tr.y[:40]
    want_loss, want = loss_and_grad(spec, w, x, y, base=base, prox_mu=mu)
    loss, got = loss_and_grad_torch(spec, w, x, y, base=base, prox_mu=mu)
    assert got.dtype == np.float64
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_same_data_and_seed_give_the_numpy_update(spec: ModelSpecMsg, mu: float) -> None:
    tr, _ = load_digits_split()
    base = init_params(spec, seed=1)
    cfg = TrainConfig(lr=0.2, local_epochs=2, batch_size=16, prox_mu=mu)
    want, want_loss = train(NumpyTrainer(), spec, base, tr.x, tr.y, cfg, seed=7)
    got, loss = train(make_trainer("torch"), spec, base, tr.x, tr.y, cfg, seed=7)
    delta = want - base
    assert np.abs(delta).max() > 0.05  # it really trained
    assert got.dtype == np.float32
    np.testing.assert_allclose(got - base, delta, rtol=0, atol=1e-5)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert np.array_equal(base, init_params(spec, seed=1))  # base not mutated


def test_torch_run_steps_in_slices_like_numpy() -> None:
    tr, _ = load_digits_split()
    spec = SPECS[0]
    run = TorchTrainer().start(
        spec, init_params(spec), tr.x[:10], tr.y[:10], TrainConfig(batch_size=3, local_epochs=2)
    )
    steps = 0
    while not run.step(1):
        steps += 1
    assert steps + 1 == 8 and run.samples_seen == 20 and run.mean_loss > 0


def test_torch_trainer_rejects_bad_shapes() -> None:
    spec = SPECS[0]
    x = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        TorchTrainer().start(spec, init_params(spec), x, np.zeros(5, np.int64), TrainConfig())
