"""``TrainConfig``'s optimizers on one flat parameter vector, in numpy (``NumpyRun``'s step).

Each is the update rule of the PyTorch optimizer that ``edge_agent.torch_trainer``'s
``FlatOptimizer`` runs for the same setting, op for op, so a job trains the same on either
trainer (up to float rounding). ``g`` is the gradient of the batch loss (proximal term
included), ``wd`` ``TrainConfig.weight_decay`` (an L2 term added to the gradient, as
``torch.optim.SGD``/``Adam``'s ``weight_decay``; every parameter, biases too), ``t`` the
step count from 1::

    sgd       g += wd*w;  w -= lr*g                       torch.optim.SGD(momentum=0)
    momentum  g += wd*w;  b = g (t = 1) | mu*b + g;       torch.optim.SGD(momentum=mu)
              w -= lr*b                                   (no dampening, not Nesterov)
    adam      g += wd*w;  m += (1 - b1)*(g - m);          torch.optim.Adam, betas
              v = b2*v + (1 - b2)*g*g;                    (0.9, 0.999), eps 1e-8
              w -= lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)

Everything runs in the dtype of ``w`` (float32 in training, float64 in tests); ``step``
updates ``w`` in place and may overwrite ``g``. An optimizer ``TrainConfig`` does not know
(a config built in code, not decoded from the wire) raises ``SchemaError("type")``, as
decoding it would have.
"""

from __future__ import annotations

import math
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from schemas.errors import SchemaError
from schemas.messages import TrainConfig

Arr = npt.NDArray[np.floating]

OPTIMIZERS: Final = ("sgd", "momentum", "adam")
ADAM_BETAS: Final = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS: Final = 1e-8


class Optimizer(Protocol):
    """Steps one flat vector given its gradient."""

    def step(self, w: Arr, g: Arr) -> None:
        """Update ``w`` in place from the gradient ``g`` (which it may overwrite)."""
        ...


def _decay(w: Arr, g: Arr, wd: float) -> None:
    """``g += wd * w`` (``torch.optim``'s ``grad.add(param, alpha=weight_decay)``)."""
    if wd:
        g += w.dtype.type(wd) * w


class Sgd:
    """``w -= lr * (g + wd*w)``: ``torch.optim.SGD(lr, weight_decay=wd)``."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.weight_decay = weight_decay

    def step(self, w: Arr, g: Arr) -> None:
        _decay(w, g, self.weight_decay)
        g *= w.dtype.type(self.lr)
        w -= g


class Momentum:
    """``torch.optim.SGD(lr, momentum, weight_decay=wd)``: the buffer starts as the first
    (decayed) gradient, then ``b = momentum*b + g``; ``w -= lr*b``."""

    def __init__(self, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buf: Arr | None = None

    def step(self, w: Arr, g: Arr) -> None:
        _decay(w, g, self.weight_decay)
        if self.buf is None:
            self.buf = g.copy()
        else:
            self.buf *= w.dtype.type(self.momentum)
            self.buf += g
        np.multiply(self.buf, w.dtype.type(self.lr), out=g)
        w -= g


class Adam:
    """``torch.optim.Adam(lr, betas, eps, weight_decay=wd)`` (no AMSGrad), with its bias
    correction: step ``lr/(1 - b1^t)``, denominator ``sqrt(v)/sqrt(1 - b2^t) + eps``."""

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = ADAM_BETAS,
        eps: float = ADAM_EPS,
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.t = 0
        self._m: Arr | None = None
        self._v: Arr | None = None
        self._tmp: Arr | None = None

    def step(self, w: Arr, g: Arr) -> None:
        if self._m is None or self._v is None or self._tmp is None:
            self._m, self._v, self._tmp = (np.zeros_like(w) for _ in range(3))
        m, v, tmp = self._m, self._v, self._tmp
        b1, b2 = self.betas
        f = w.dtype.type
        self.t += 1
        _decay(w, g, self.weight_decay)
        np.subtract(g, m, out=tmp)  # m.lerp_(g, 1 - b1)
        tmp *= f(1.0 - b1)
        m += tmp
        v *= f(b2)  # v.mul_(b2).addcmul_(g, g, value=1 - b2)
        np.multiply(g, g, out=tmp)
        tmp *= f(1.0 - b2)
        v += tmp
        step_size = self.lr / (1.0 - b1**self.t)
        np.sqrt(v, out=tmp)  # denom = v.sqrt() / sqrt(1 - b2^t) + eps
        tmp /= f(math.sqrt(1.0 - b2**self.t))
        tmp += f(self.eps)
        np.divide(m, tmp, out=tmp)  # w.addcdiv_(m, denom, value=-step_size)
        tmp *= f(step_size)
        w -= tmp


def make_optimizer(cfg: TrainConfig) -> Optimizer:
    """The optimizer ``cfg`` names, with its ``lr``, ``momentum`` and ``weight_decay``."""
    if cfg.optimizer == "sgd":
        return Sgd(cfg.lr, cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return Momentum(cfg.lr, cfg.momentum, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return Adam(cfg.lr, cfg.weight_decay)
    raise SchemaError("type", f"unknown optimizer {cfg.optimizer!r} (one of {OPTIMIZERS})")
