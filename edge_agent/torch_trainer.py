"""Optional PyTorch trainer (``pip install fedfleet[torch]``), same contract as the numpy one.

``TorchTrainer`` trains the built-in families (``softmax``, ``mlp``) on the flat parameter
layout of ``schemas.modelspec`` with autograd: the ``TrainConfig`` loss (mean cross-entropy,
or ``mse`` on the logits vs one-hot targets) plus the FedAsync proximal term
``prox_mu/2 * ||w - w_base||^2``, and its optimizer (``sgd``, ``momentum``, ``adam``; with
``weight_decay``), all on the flat trainable vector. Batching, shuffling and seeding are
inherited from ``NumpyRun``, so on the same data and seed both trainers visit the same
batches and, for the default ``sgd`` + ``cross_entropy``, produce the same update (up to
float32 rounding). ``task_loss`` and ``FlatOptimizer`` are shared with
``edge_agent.onnx_trainer``.

``torch`` is imported lazily: importing this module never fails, ``TorchTrainer()`` raises
``TrainerUnavailable`` when the extra is not installed. Parameters stay a numpy array that
a torch tensor shares memory with (CPU only; no copies per step).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import TrainerUnavailable
from edge_agent.trainers import Arr, Labels, NumpyRun, _slices
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import standardize
from schemas.types import F32


def _torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise TrainerUnavailable(
            "torch_missing", "the torch trainer needs `pip install fedfleet[torch]`"
        ) from None


def task_loss(torch: Any, z: Any, y: Any, kind: str = "cross_entropy") -> Any:
    """Mean cross-entropy of logits ``z`` and class indices ``y``, or (``mse``) the mean over
    batch and classes of ``(z - one_hot(y))^2``."""
    f = torch.nn.functional
    if kind == "mse":
        return f.mse_loss(z, f.one_hot(y, z.shape[-1]).to(z.dtype))
    return f.cross_entropy(z, y)


def prox(loss: Any, w: Any, base: Any, mu: float) -> Any:
    """``loss + mu/2 * ||w - base||^2`` (``loss`` itself when ``mu`` is 0)."""
    if mu > 0.0 and base is not None:
        diff = w - base
        loss = loss + 0.5 * mu * (diff @ diff)
    return loss


class FlatOptimizer:
    """``TrainConfig``'s optimizer on one flat leaf tensor ``w`` (its ``.grad`` set by
    backward): ``sgd`` is ``w -= lr * (g + weight_decay * w)`` in place (``torch.optim.SGD``'s
    rule without its per-step overhead), ``momentum`` ``torch.optim.SGD(momentum=...)``,
    ``adam`` ``torch.optim.Adam`` (``weight_decay`` as an L2 term in the gradient)."""

    def __init__(self, torch: Any, w: Any, cfg: TrainConfig) -> None:
        self._torch = torch
        self._w = w
        self._lr = float(np.float32(cfg.lr))  # the numpy trainer steps in float32
        self._wd = float(cfg.weight_decay)
        self._opt: Any = None
        if cfg.optimizer == "momentum":
            self._opt = torch.optim.SGD(
                [w], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "adam":
            self._opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self) -> None:
        if self._opt is not None:
            self._opt.step()
            return
        g = self._w.grad
        with self._torch.no_grad():
            if self._wd:
                g.add_(self._w, alpha=self._wd)
            self._w.sub_(g, alpha=self._lr)  # in place: a numpy array sharing w follows


def _loss(
    torch: Any,
    spec: ModelSpecMsg,
    w: Any,
    x: Any,
    y: Any,
    base: Any,
    mu: float,
    kind: str = "cross_entropy",
) -> Any:
    """Autograd loss on the flat tensor ``w`` (views per tensor, as in ``modelspec``);
    ``x`` is already standardised (``NumpyRun`` does it once per run)."""
    p = {k: w[a:b].view(shape) for k, (a, b, shape) in _slices(spec).items()}
    if spec.family == "softmax":
        z = x @ p["W"] + p["b"]
    else:
        z = torch.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
    return prox(task_loss(torch, z, y, kind), w, base, mu)


def loss_and_grad_torch(
    spec: ModelSpecMsg,
    flat: Arr,
    x: Arr,
    y: Labels,
    *,
    base: Arr | None = None,
    prox_mu: float = 0.0,
    loss: str = "cross_entropy",
) -> tuple[float, Arr]:
    """``trainers.loss_and_grad`` computed by torch autograd (same dtype as ``flat``; raw
    features, standardised first when the spec says so); ``loss`` as ``TrainConfig.loss``."""
    torch = _torch()
    w = torch.tensor(np.asarray(flat), requires_grad=True)
    xt = torch.as_tensor(np.asarray(standardize(spec, np.asarray(x, dtype=flat.dtype))))
    bt = None if base is None else torch.as_tensor(np.asarray(base, dtype=flat.dtype))
    yt = torch.as_tensor(y, dtype=torch.int64)
    value = _loss(torch, spec, w, xt, yt, bt, prox_mu, loss)
    value.backward()
    return float(value.item()), w.grad.numpy()


class TorchRun(NumpyRun):
    """``NumpyRun`` whose step is computed by torch autograd and ``FlatOptimizer``."""

    def __init__(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        seed: int,
        *,
        torch: Any,
    ) -> None:
        super().__init__(spec, base, x, y, cfg, seed)
        self._torch = torch
        self._wt = torch.from_numpy(self._w).requires_grad_(True)  # shares self._w
        self._bt = torch.from_numpy(self._base)
        self._xt = torch.from_numpy(self._x)
        self._yt = torch.from_numpy(self._y)
        self._opt = FlatOptimizer(torch, self._wt, cfg)

    def _sgd_step(self, idx: npt.NDArray[np.intp], lr: np.float32) -> float:
        torch = self._torch
        it = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        self._wt.grad = None
        cfg = self._cfg
        loss = _loss(
            torch, self._spec, self._wt, self._xt[it], self._yt[it], self._bt, cfg.prox_mu,
            cfg.loss,
        )  # fmt: skip
        loss.backward()
        self._opt.step()  # in place: self._w follows
        return float(loss.item())


class TorchTrainer:
    """Built-in families trained with PyTorch (CPU). ``threads`` caps torch's intra-op pool."""

    def __init__(self, *, threads: int = 1) -> None:
        self._torch = _torch()
        if threads > 0:
            self._torch.set_num_threads(threads)

    def start(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        *,
        seed: int = 0,
    ) -> TorchRun:
        return TorchRun(spec, base, x, y, cfg, seed, torch=self._torch)
