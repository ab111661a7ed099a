"""Local training behind a small ``Trainer`` protocol, plus the built-in numpy trainer.

The numpy trainer uses the flat parameter layout of ``schemas.modelspec`` (softmax regression
or a one-hidden-layer ReLU MLP) and honours the whole ``TrainConfig`` as the PyTorch trainer
(``edge_agent.torch_trainer``) does: the loss (``cross_entropy``: mean cross-entropy of the
logits; ``mse``: mean over batch and classes of ``(logits - one_hot(y))^2``, on the logits
as ``torch_trainer.task_loss``, not on the softmax), the optional FedAsync proximal term
``prox_mu/2 * ||w - w_base||^2`` added to it, and the optimizer with its weight decay
(``edge_agent.numpy_optim``: ``torch.optim.SGD``/``Adam``'s rules). Training advances in
``step(n)`` slices so the agent can yield to the event loop and re-check the resource gate
between slices. A loss or optimizer ``TrainConfig`` does not know (possible only for a
config built in code) raises ``SchemaError("type")`` at ``start``.

Trainers take raw features: a spec with ``input_mean`` is standardised inside the model
(``schemas.modelspec.standardize``), here once per run, before the first layer.
"""

from __future__ import annotations

import functools
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.numpy_optim import make_optimizer
from schemas.errors import SchemaError
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import forward, layout, num_params, standardize
from schemas.types import F32

Arr = npt.NDArray[np.floating]
Labels = npt.NDArray[np.int64]

LOSSES: Final = ("cross_entropy", "mse")


class TrainRun(Protocol):
    """A local training run in progress."""

    @property
    def done(self) -> bool: ...

    @property
    def params(self) -> F32:
        """Current flat parameters (float32)."""
        ...

    @property
    def mean_loss(self) -> float:
        """Mean training loss over the batches done so far."""
        ...

    @property
    def samples_seen(self) -> int: ...

    def step(self, max_batches: int) -> bool:
        """Run up to ``max_batches`` mini-batches; return ``done``."""
        ...


class Trainer(Protocol):
    """Starts training runs. Implementations must not mutate ``base``."""

    def start(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        *,
        seed: int = 0,
    ) -> TrainRun: ...


# --------------------------------------------------------------------------- pure math


def _slices(spec: ModelSpecMsg) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (start, stop, shape) of each tensor in the flat vector (cached per shape:
    cheaper to hash than a spec with its standardisation vectors)."""
    return _slices_of(spec.family, spec.n_features, spec.n_classes, spec.hidden)


@functools.lru_cache(maxsize=64)
def _slices_of(
    family: str, n_features: int, n_classes: int, hidden: int
) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    spec = ModelSpecMsg(
        family=family,  # type: ignore[arg-type]
        n_features=n_features,
        n_classes=n_classes,
        hidden=hidden,
    )
    return {t.name: (t.offset, t.offset + t.size, t.shape) for t in layout(spec)}


def _views(spec: ModelSpecMsg, flat: Arr) -> dict[str, Arr]:
    sl = _slices(spec)
    last = max(stop for _, stop, _ in sl.values())
    if flat.shape != (last,):
        raise ValueError(f"expected {last} parameters, got shape {flat.shape}")
    return {k: flat[a:b].reshape(shape) for k, (a, b, shape) in sl.items()}


def check_loss(kind: str) -> None:
    """Raise ``SchemaError("type")`` unless ``kind`` is one of ``LOSSES``."""
    if kind not in LOSSES:
        raise SchemaError("type", f"unknown loss {kind!r} (one of {LOSSES})")


def loss_and_grad(
    spec: ModelSpecMsg,
    flat: Arr,
    x: Arr,
    y: Labels,
    *,
    base: Arr | None = None,
    prox_mu: float = 0.0,
    loss: str = "cross_entropy",
) -> tuple[float, Arr]:
    """The ``loss`` (``TrainConfig.loss``; + proximal term) and its gradient w.r.t. the flat
    vector, on raw features ``x`` (standardised first when the spec says so).

    Works in the dtype of ``flat`` (float64 for gradient checks, float32 in training).
    """
    check_loss(loss)
    xs = standardize(spec, x)
    return _loss_and_grad(spec, flat, xs, y, base=base, prox_mu=prox_mu, loss=loss)


def _loss_and_grad(
    spec: ModelSpecMsg,
    flat: Arr,
    x: Arr,
    y: Labels,
    *,
    base: Arr | None,
    prox_mu: float,
    loss: str = "cross_entropy",
) -> tuple[float, Arr]:
    """``loss_and_grad`` on features already standardised (``loss`` already checked)."""
    p = _views(spec, flat)
    n = x.shape[0]
    grad = np.empty_like(flat)
    g = _views(spec, grad)
    z: Arr
    if spec.family == "softmax":
        z = x @ p["W"]
        z += p["b"]
    else:
        pre = x @ p["W1"]
        pre += p["b1"]
        h = np.maximum(pre, 0.0)
        z = h @ p["W2"]
        z += p["b2"]
    rows = np.arange(n)
    d: Arr  # d loss / d logits
    if loss == "mse":  # mean over n*C of (z - one_hot(y))^2, on the logits
        d = z
        d[rows, y] -= 1.0
        value = float(np.mean(np.square(d)))
        d *= 2.0 / d.size
    else:  # mean cross-entropy of softmax(z)
        z -= z.max(axis=1, keepdims=True)
        d = np.exp(z)
        s = d.sum(axis=1)
        value = float(np.mean(np.log(s) - z[rows, y]))
        d /= s[:, None]
        d[rows, y] -= 1.0
        d /= n
    if spec.family == "softmax":
        np.matmul(x.T, d, out=g["W"])
        np.sum(d, axis=0, out=g["b"])
    else:
        np.matmul(h.T, d, out=g["W2"])
        np.sum(d, axis=0, out=g["b2"])
        dh = d @ p["W2"].T
        dh *= pre > 0
        np.matmul(x.T, dh, out=g["W1"])
        np.sum(dh, axis=0, out=g["b1"])
    if prox_mu > 0.0 and base is not None:
        diff = flat - base
        value += 0.5 * prox_mu * float(diff @ diff)
        grad += prox_mu * diff
    return value, grad


# --------------------------------------------------------------------------- numpy trainer


class NumpyRun:
    """``cfg``'s optimizer on mini-batches over ``local_epochs`` shuffled epochs."""

    def __init__(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        seed: int,
    ) -> None:
        n = num_params(spec)
        if base.shape != (n,):
            raise ValueError(f"base has shape {base.shape}, model needs ({n},)")
        if x.ndim != 2 or x.shape[1] != spec.n_features or x.shape[0] != y.shape[0]:
            raise ValueError(f"data shape {x.shape}/{y.shape} does not fit the model")
        if x.shape[0] == 0:
            raise ValueError("no training data")
        check_loss(cfg.loss)
        self._optim = make_optimizer(cfg)  # raises on an unknown optimizer; state is lazy
        self._spec = spec
        self._base = base.astype(np.float32, copy=True)
        self._w = self._base.copy()
        self._x = np.ascontiguousarray(standardize(spec, x), dtype=np.float32)
        self._y = y.astype(np.int64, copy=False)
        self._cfg = cfg
        self._rng = np.random.default_rng(seed)
        rows = int(x.shape[0])
        self._bs: int = min(cfg.batch_size, rows)
        self._per_epoch: int = -(-rows // self._bs)
        self._total: int = self._per_epoch * cfg.local_epochs
        self._done_batches: int = 0
        self._order = self._rng.permutation(x.shape[0])
        self._loss_sum = 0.0
        self._samples: int = 0

    @property
    def done(self) -> bool:
        return self._done_batches >= self._total

    @property
    def params(self) -> F32:
        return self._w

    @property
    def mean_loss(self) -> float:
        return self._loss_sum / self._done_batches if self._done_batches else 0.0

    @property
    def samples_seen(self) -> int:
        return self._samples

    @property
    def total_batches(self) -> int:
        return self._total

    def step(self, max_batches: int) -> bool:
        lr = np.float32(self._cfg.lr)
        for _ in range(max(1, max_batches)):
            if self.done:
                break
            i = self._done_batches % self._per_epoch
            if i == 0 and self._done_batches:
                self._order = self._rng.permutation(self._x.shape[0])
            idx = self._order[i * self._bs : (i + 1) * self._bs]
            loss = self._sgd_step(idx, lr)
            if not np.isfinite(loss):  # a non-finite gradient makes the next loss non-finite
                raise FloatingPointError("training diverged (non-finite loss)")
            self._loss_sum += loss
            self._samples += len(idx)
            self._done_batches += 1
        return self.done

    def _sgd_step(self, idx: npt.NDArray[np.intp], lr: np.float32) -> float:
        """One optimizer step on rows ``idx`` (updates ``self._w`` in place); returns the
        loss. ``lr`` is ``cfg.lr`` in float32; the optimizer holds its own copy.

        Subclasses (``edge_agent.torch_trainer``) replace only this: batching, shuffling
        and seeding stay identical, so trainers agree on the same data and seed.
        """
        cfg = self._cfg
        loss, grad = _loss_and_grad(
            self._spec,
            self._w,
            self._x[idx],
            self._y[idx],
            base=self._base,
            prox_mu=cfg.prox_mu,
            loss=cfg.loss,
        )
        self._optim.step(self._w, grad)
        return loss


class NumpyTrainer:
    """Built-in trainer for the ``softmax`` and ``mlp`` families."""

    def start(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        *,
        seed: int = 0,
    ) -> NumpyRun:
        return NumpyRun(spec, base, x, y, cfg, seed)


def train(
    trainer: Trainer,
    spec: ModelSpecMsg,
    base: F32,
    x: F32,
    y: Labels,
    cfg: TrainConfig,
    *,
    seed: int = 0,
) -> tuple[F32, float]:
    """Run to completion synchronously; return (params, mean loss)."""
    run = trainer.start(spec, base, x, y, cfg, seed=seed)
    while not run.step(64):
        pass
    return run.params, run.mean_loss


def accuracy(spec: ModelSpecMsg, flat: F32, x: F32, y: Labels) -> float:
    """Share of correctly classified rows (numpy reference forward, raw features)."""
    return float((forward(spec, flat, x).argmax(axis=1) == y).mean())
