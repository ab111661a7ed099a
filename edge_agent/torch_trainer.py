"""Optional PyTorch trainer (``pip install fedfleet[torch]``), same contract as the numpy one.

``TorchTrainer`` trains the built-in families (``softmax``, ``mlp``) on the flat parameter
layout of ``schemas.modelspec`` with autograd: mean cross-entropy plus the FedAsync
proximal term ``prox_mu/2 * ||w - w_base||^2``, mini-batch SGD. Batching, shuffling and
seeding are inherited from ``NumpyRun``, so on the same data and seed both trainers visit
the same batches and produce the same update (up to float32 rounding).

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


def _loss(torch: Any, spec: ModelSpecMsg, w: Any, x: Any, y: Any, base: Any, mu: float) -> Any:
    """Autograd loss on the flat tensor ``w`` (views per tensor, as in ``modelspec``);
    ``x`` is already standardised (``NumpyRun`` does it once per run)."""
    p = {k: w[a:b].view(shape) for k, (a, b, shape) in _slices(spec).items()}
    if spec.family == "softmax":
        z = x @ p["W"] + p["b"]
    else:
        z = torch.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
    loss = torch.nn.functional.cross_entropy(z, y)
    if mu > 0.0 and base is not None:
        diff = w - base
        loss = loss + 0.5 * mu * (diff @ diff)
    return loss


def loss_and_grad_torch(
    spec: ModelSpecMsg,
    flat: Arr,
    x: Arr,
    y: Labels,
    *,
    base: Arr | None = None,
    prox_mu: float = 0.0,
) -> tuple[float, Arr]:
    """``trainers.loss_and_grad`` computed by torch autograd (same dtype as ``flat``; raw
    features, standardised first when the spec says so)."""
    torch = _torch()
    w = torch.tensor(np.asarray(flat), requires_grad=True)
    xt = torch.as_tensor(np.asarray(standardize(spec, np.asarray(x, dtype=flat.dtype))))
    bt = None if base is None else torch.as_tensor(np.asarray(base, dtype=flat.dtype))
    loss = _loss(torch, spec, w, xt, torch.as_tensor(y, dtype=torch.int64), bt, prox_mu)
    loss.backward()
    return float(loss.item()), w.grad.numpy()


class TorchRun(NumpyRun):
    """``NumpyRun`` whose SGD step is computed by torch autograd."""

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

    def _sgd_step(self, idx: npt.NDArray[np.intp], lr: np.float32) -> float:
        torch = self._torch
        it = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        self._wt.grad = None
        loss = _loss(
            torch, self._spec, self._wt, self._xt[it], self._yt[it], self._bt, self._cfg.prox_mu
        )
        loss.backward()
        with torch.no_grad():
            self._wt.sub_(self._wt.grad, alpha=float(lr))  # in place: self._w follows
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
