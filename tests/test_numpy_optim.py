"""The numpy trainer's optimizers, losses and weight decay against PyTorch itself.

The reference is ``torch.nn.Linear`` models, ``torch.nn.functional`` losses and
``torch.optim.SGD``/``Adam``, built here from the same initial weights and fed the same
batches, not fedfleet's own torch trainer. Tests that need torch skip without it (the
``fedfleet[torch]`` extra, installed in CI).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.numpy_optim import Adam, Momentum, Sgd, make_optimizer
from edge_agent.trainers import NumpyRun, NumpyTrainer, loss_and_grad, train
from schemas.errors import SchemaError
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import init_params, num_params, unflatten

SOFTMAX = ModelSpecMsg(family="softmax", n_features=6, n_classes=4)
MLP = ModelSpecMsg(family="mlp", n_features=6, n_classes=4, hidden=5)
SPECS = [SOFTMAX, MLP]

# (optimizer, momentum, weight_decay): every optimizer with and without weight decay; "sgd"
# keeps TrainConfig's default momentum 0.9, which only "momentum" uses
OPTIMS = [
    ("sgd", 0.9, 0.0),
    ("sgd", 0.9, 0.05),
    ("momentum", 0.8, 0.0),
    ("momentum", 0.8, 0.05),
    ("adam", 0.9, 0.0),
    ("adam", 0.9, 0.05),
]


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


def _data(n: int, spec: ModelSpecMsg, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, spec.n_features)).astype(np.float32)
    return x, rng.integers(0, spec.n_classes, size=n).astype(np.int64)


def _base(spec: ModelSpecMsg, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (init_params(spec, seed=seed) + rng.normal(scale=0.1, size=num_params(spec))).astype(
        np.float32
    )


def _torch_model(torch: Any, spec: ModelSpecMsg, flat: np.ndarray, dtype: Any) -> Any:
    """``spec``'s model as ``torch.nn`` layers holding ``flat`` (``W`` is ``weight.T``)."""
    p = {k: torch.tensor(v, dtype=dtype) for k, v in unflatten(spec, flat).items()}
    if spec.family == "softmax":
        model = torch.nn.Linear(spec.n_features, spec.n_classes, dtype=dtype)
        layers = [(model, "W", "b")]
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(spec.n_features, spec.hidden, dtype=dtype),
            torch.nn.ReLU(),
            torch.nn.Linear(spec.hidden, spec.n_classes, dtype=dtype),
        )
        layers = [(model[0], "W1", "b1"), (model[2], "W2", "b2")]
    with torch.no_grad():
        for lin, w, b in layers:
            lin.weight.copy_(p[w].T)
            lin.bias.copy_(p[b])
    return model


def _flat(spec: ModelSpecMsg, model: Any, *, grad: bool = False) -> np.ndarray:
    """The torch model's parameters (or their gradients) in ``schemas.modelspec``'s flat
    layout."""
    lins = [model] if spec.family == "softmax" else [model[0], model[2]]
    parts: list[np.ndarray] = []
    for lin in lins:
        w, b = (lin.weight.grad, lin.bias.grad) if grad else (lin.weight, lin.bias)
        parts += [w.detach().T.reshape(-1).numpy(), b.detach().numpy()]
    return np.concatenate(parts)


def _prox(loss: Any, params: Any, anchors: Any, mu: float) -> Any:
    """``loss + mu/2 * ||w - w0||^2`` over all parameter tensors (FedAsync)."""
    if mu <= 0:
        return loss
    return loss + 0.5 * mu * sum(((q - a) ** 2).sum() for q, a in zip(params, anchors, strict=True))


def _torch_optim(torch: Any, params: Any, cfg: TrainConfig) -> Any:
    if cfg.optimizer == "adam":  # PyTorch's defaults: betas (0.9, 0.999), eps 1e-8
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mom = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=mom, weight_decay=cfg.weight_decay)


def _torch_loss(torch: Any, z: Any, y: Any, kind: str) -> Any:
    f = torch.nn.functional
    if kind == "mse":  # on the logits, against one-hot targets
        return f.mse_loss(z, f.one_hot(y, z.shape[-1]).to(z.dtype))
    return f.cross_entropy(z, y)


def _torch_train(
    torch: Any,
    spec: ModelSpecMsg,
    base: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    batches: list[np.ndarray],
    dtype: Any,
) -> tuple[np.ndarray, list[float]]:
    """Train the torch reference on ``batches`` (row indices, in order); return its flat
    parameters and the loss of each batch (proximal term included)."""
    model = _torch_model(torch, spec, base, dtype)
    params = list(model.parameters())
    anchors = [q.detach().clone() for q in params]
    opt = _torch_optim(torch, params, cfg)
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y)
    losses: list[float] = []
    for idx in batches:
        it = torch.as_tensor(idx)
        opt.zero_grad()
        task = _torch_loss(torch, model(xt[it]), yt[it], cfg.loss)
        loss = _prox(task, params, anchors, cfg.prox_mu)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return _flat(spec, model), losses


class _Recording(NumpyRun):
    """A ``NumpyRun`` that records the row indices of every batch it trains on."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[np.ndarray] = []

    def _sgd_step(self, idx: Any, lr: np.float32) -> float:
        self.batches.append(np.array(idx, dtype=np.int64))
        return super()._sgd_step(idx, lr)


def _cfg(opt: tuple[str, float, float], **kw: Any) -> TrainConfig:
    name, mom, wd = opt
    return TrainConfig(optimizer=name, momentum=mom, weight_decay=wd, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------- the optimizers alone


@pytest.mark.parametrize("opt", OPTIMS, ids=lambda o: f"{o[0]}-wd{o[2]}")
def test_update_rule_is_torch_optim_on_the_same_gradients(torch: Any, opt: Any) -> None:
    """Float64, one flat tensor, a fixed sequence of gradients: the same iterates."""
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=50)
    grads = [rng.normal(scale=s, size=50) for s in (1.0, 0.1, 3.0, 1e-3, 0.5, 1.0, 2.0)]
    cfg = _cfg(opt, lr=0.05)
    ours = make_optimizer(cfg)
    w = w0.copy()
    wt = torch.tensor(w0, requires_grad=True)
    ref = _torch_optim(torch, [wt], cfg)
    for g in grads:
        ours.step(w, g.copy())
        wt.grad = torch.tensor(g)
        ref.step()
        np.testing.assert_allclose(w, wt.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_make_optimizer_maps_each_setting() -> None:
    sgd = make_optimizer(TrainConfig(lr=0.3, weight_decay=0.1))
    assert isinstance(sgd, Sgd) and (sgd.lr, sgd.weight_decay) == (0.3, 0.1)
    mom = make_optimizer(TrainConfig(optimizer="momentum", momentum=0.7))
    assert isinstance(mom, Momentum) and mom.momentum == 0.7
    adam = make_optimizer(TrainConfig(optimizer="adam", lr=0.01))
    assert isinstance(adam, Adam) and (adam.betas, adam.eps) == ((0.9, 0.999), 1e-8)


def test_sgd_step_is_the_previous_plain_sgd_bit_for_bit() -> None:
    """Default config (sgd, no weight decay): ``w -= float32(lr) * g``, as before."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=20).astype(np.float32)
    g = rng.normal(size=20).astype(np.float32)
    want = w - np.float32(0.1) * g
    make_optimizer(TrainConfig(lr=0.1)).step(w, g.copy())
    assert np.array_equal(w, want)


# ------------------------------------------------------------------- losses


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("mu", [0.0, 0.4])
def test_loss_and_gradient_are_torch_autograd(
    torch: Any, spec: ModelSpecMsg, kind: str, mu: float
) -> None:
    x, y = _data(9, spec)
    w = _base(spec).astype(np.float64)
    base = _base(spec, seed=2).astype(np.float64)
    loss, grad = loss_and_grad(spec, w, x.astype(np.float64), y, base=base, prox_mu=mu, loss=kind)
    model = _torch_model(torch, spec, w, torch.float64)
    ref = _torch_loss(torch, model(torch.tensor(x, dtype=torch.float64)), torch.tensor(y), kind)
    anchors = [a.detach() for a in _torch_model(torch, spec, base, torch.float64).parameters()]
    ref = _prox(ref, list(model.parameters()), anchors, mu)
    ref.backward()
    assert loss == pytest.approx(float(ref.item()), rel=1e-12)
    np.testing.assert_allclose(grad, _flat(spec, model, grad=True), rtol=1e-10, atol=1e-12)


def test_mse_is_on_the_logits_not_the_softmax() -> None:
    """Zero weights give zero logits: the mse against one-hot is 1/C (on the softmax it
    would be ((1 - 1/C)^2 + (C-1)/C^2)/C)."""
    x, y = _data(5, SOFTMAX)
    w = np.zeros(num_params(SOFTMAX))
    loss, _ = loss_and_grad(SOFTMAX, w, x.astype(np.float64), y, loss="mse")
    assert loss == pytest.approx(1 / SOFTMAX.n_classes)


# ------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
@pytest.mark.parametrize("opt", OPTIMS, ids=lambda o: f"{o[0]}-wd{o[2]}")
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_full_batch_run_matches_torch_optim(
    torch: Any, spec: ModelSpecMsg, opt: Any, kind: str, mu: float
) -> None:
    """One full batch per epoch (order-free), five epochs: five optimizer steps."""
    x, y = _data(24, spec)
    base = _base(spec)
    lr = 0.01 if opt[0] == "adam" else 0.2
    cfg = _cfg(opt, lr=lr, batch_size=64, local_epochs=5, prox_mu=mu, loss=kind)
    got, got_loss = train(NumpyTrainer(), spec, base, x, y, cfg, seed=4)
    rows = np.arange(len(y))
    want, losses = _torch_train(torch, spec, base, x, y, cfg, [rows] * 5, torch.float32)
    assert got.dtype == np.float32
    assert np.abs(want - base).max() > 1e-3  # it really trained
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got_loss == pytest.approx(np.mean(losses), rel=1e-5)
    assert np.array_equal(base, _base(spec))  # base not mutated


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
@pytest.mark.parametrize("opt", OPTIMS[1::2], ids=lambda o: o[0])  # with weight decay
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_shuffled_mini_batches_match_torch_on_the_same_batches(
    torch: Any, spec: ModelSpecMsg, opt: Any, kind: str
) -> None:
    """Batches of 8 over 30 rows (the last one 6 rows), three shuffled epochs, prox on: the
    optimizer state carries across batches and epochs as in torch."""
    x, y = _data(30, spec, seed=5)
    base = _base(spec)
    lr = 0.01 if opt[0] == "adam" else 0.1
    cfg = _cfg(opt, lr=lr, batch_size=8, local_epochs=3, prox_mu=0.3, loss=kind)
    run = _Recording(spec, base, x, y, cfg, 9)
    while not run.step(5):
        pass
    assert len(run.batches) == 12 and [len(b) for b in run.batches[:4]] == [8, 8, 8, 6]
    want, losses = _torch_train(torch, spec, base, x, y, cfg, run.batches, torch.float32)
    np.testing.assert_allclose(run.params, want, rtol=1e-5, atol=1e-5)
    assert run.mean_loss == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
@pytest.mark.parametrize("opt", OPTIMS, ids=lambda o: f"{o[0]}-wd{o[2]}")
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_numpy_and_torch_trainers_train_a_job_the_same(
    torch: Any, spec: ModelSpecMsg, opt: Any, kind: str
) -> None:
    from edge_agent.torch_trainer import TorchTrainer

    x, y = _data(40, spec, seed=6)
    base = _base(spec)
    lr = 0.01 if opt[0] == "adam" else 0.1
    cfg = _cfg(opt, lr=lr, batch_size=8, local_epochs=2, prox_mu=0.2, loss=kind)
    want, want_loss = train(TorchTrainer(), spec, base, x, y, cfg, seed=3)
    got, got_loss = train(NumpyTrainer(), spec, base, x, y, cfg, seed=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)


# ------------------------------------------------------------------- settings it does not know


@pytest.mark.parametrize(
    "bad", [{"optimizer": "rmsprop"}, {"loss": "hinge"}], ids=["optimizer", "loss"]
)
def test_unknown_setting_is_a_typed_error_at_start(bad: dict[str, str]) -> None:
    """A ``TrainConfig`` built in code skips the wire's Literal check: ``start`` refuses it
    with ``SchemaError("type")`` (a ``ValueError``: the agent aborts the task)."""
    cfg = TrainConfig(**bad)  # type: ignore[arg-type]
    x, y = _data(4, SOFTMAX)
    with pytest.raises(SchemaError) as err:
        NumpyTrainer().start(SOFTMAX, _base(SOFTMAX), x, y, cfg)
    assert err.value.reason == "type" and isinstance(err.value, ValueError)
    assert next(iter(bad.values())) in err.value.detail


def test_unknown_loss_is_a_typed_error_in_loss_and_grad() -> None:
    x, y = _data(4, SOFTMAX)
    with pytest.raises(SchemaError):
        loss_and_grad(SOFTMAX, _base(SOFTMAX), x, y, loss="hinge")
