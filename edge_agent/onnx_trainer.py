"""PyTorch training of a family ``onnx`` job (any model the job's ONNX graph describes).

``OnnxTorchTrainer().start(spec, base, x, y, cfg, seed=..., artifact=...)`` returns a
``TrainRun`` (``edge_agent.trainers``) like the built-in trainers, given the verified
normalised artifact bytes as well. The module is built by ``edge_agent.torch_models``
(``spec.torch_module`` when set, else onnx2torch; one per artifact, cached) and its
trainable tensors are views of the flat vector, so ``params`` is the flat float32 vector
in ``spec.params`` order.

At start the module's logits on up to ``CHECK_ROWS`` local rows must equal onnxruntime's on
``schemas.artifact.with_weights(artifact, spec.params, base)`` (``atol``/``rtol`` 1e-4), or
``start`` raises ``ModelMismatch`` (``reason`` ``model_mismatch:max_abs_diff=...``); a module
that cannot be built raises ``ModelUnsupported`` (a ``ModelMismatch``, ``reason``
``model_unsupported:...``). Rows arrive flat and raw: standardised as
``schemas.modelspec.standardize`` (once per run), then viewed as ``[n, *input_shape]``.
Loss, optimizer, weight decay, the FedAsync proximal term ``prox_mu/2 * ||w - w_base||^2``,
lr, batch size and epochs come from ``TrainConfig``; batching, shuffling and seeding are
``NumpyRun``'s; a non-finite loss raises ``FloatingPointError``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.torch_models import ModelMismatch, ModelUnsupported, TorchModel, build
from edge_agent.torch_trainer import FlatOptimizer, _torch, prox, task_loss
from edge_agent.trainers import Labels, NumpyRun
from schemas.artifact import ArtifactError, with_weights
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.types import F32

__all__ = ["ModelMismatch", "ModelUnsupported", "OnnxRun", "OnnxTorchTrainer", "check_forward"]

CHECK_ROWS = 16
ATOL = RTOL = 1e-4


def check_forward(model: TorchModel, artifact: bytes, spec: ModelSpecMsg, w: Any, x: Any) -> None:
    """Raise ``ModelMismatch`` unless the module's logits on ``x`` (standardised rows
    ``[n, *input_shape]``, a torch tensor) equal onnxruntime's for the weights ``w``."""
    import onnxruntime as ort
    import torch

    try:
        weighted = with_weights(artifact, spec.params, w.detach().numpy())
    except ArtifactError as exc:  # the spec's parameters do not fit the artifact
        raise ModelMismatch(f"artifact_{exc.code}", exc.detail) from None
    rows = x.numpy()
    opts = ort.SessionOptions()  # a one-off run on a few rows: no graph passes, no pool
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(weighted, opts, providers=["CPUExecutionProvider"])
    want = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: rows})[0]
    with torch.no_grad():
        got = model.logits(w, x).numpy()
    if got.shape != want.shape:
        raise ModelMismatch(f"logits_shape={'x'.join(map(str, got.shape))}", str(want.shape))
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
    if not np.allclose(got, want, atol=ATOL, rtol=RTOL) or not np.isfinite(diff):
        raise ModelMismatch(f"max_abs_diff={diff:.2e}", "torch and onnxruntime logits differ")


class OnnxRun(NumpyRun):
    """``NumpyRun`` whose step trains ``model`` (a ``TorchModel``) with torch."""

    def __init__(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        seed: int,
        *,
        model: TorchModel,
        artifact: bytes,
        torch: Any,
    ) -> None:
        super().__init__(spec, base, x, y, cfg, seed)
        self._torch = torch
        self._model = model
        self._wt = torch.from_numpy(self._w).requires_grad_(True)  # shares self._w
        self._bt = torch.from_numpy(self._base)
        self._xt = torch.from_numpy(self._x).view(self._x.shape[0], *spec.input_shape)
        self._yt = torch.from_numpy(self._y)
        check_forward(model, artifact, spec, self._wt, self._xt[:CHECK_ROWS])
        self._opt = FlatOptimizer(torch, self._wt, cfg)

    def _sgd_step(self, idx: npt.NDArray[np.intp], lr: np.float32) -> float:
        it = self._torch.from_numpy(np.asarray(idx, dtype=np.int64))
        cfg = self._cfg
        self._wt.grad = None
        z = self._model.logits(self._wt, self._xt[it])
        loss = prox(
            task_loss(self._torch, z, self._yt[it], cfg.loss), self._wt, self._bt, cfg.prox_mu
        )
        loss.backward()
        if self._wt.grad is None:
            raise ModelMismatch("no_gradient", "the loss does not depend on the parameters")
        self._opt.step()  # in place: self._w follows
        return float(loss.item())


class OnnxTorchTrainer:
    """Trains ``onnx`` jobs with PyTorch (CPU). ``threads`` caps torch's intra-op pool;
    ``cache`` modules (one per artifact + parameter list + ``torch_module``) are kept."""

    def __init__(self, *, threads: int = 1, cache: int = 2) -> None:
        self._torch = _torch()
        if threads > 0:
            self._torch.set_num_threads(threads)
        self._size = max(1, cache)
        self._models: OrderedDict[tuple[object, ...], TorchModel] = OrderedDict()

    def model(self, spec: ModelSpecMsg, artifact: bytes) -> TorchModel:
        """The (cached) trainable module for ``spec`` and its artifact."""
        key = (hashlib.sha256(artifact).digest(), spec.params, spec.torch_module)
        got = self._models.get(key)
        if got is None:
            got = build(spec, artifact)
            self._models[key] = got
            while len(self._models) > self._size:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return got

    def start(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        *,
        seed: int = 0,
        artifact: bytes,
    ) -> OnnxRun:
        if spec.family != "onnx":
            raise ValueError(f"OnnxTorchTrainer trains family onnx, not {spec.family}")
        model = self.model(spec, artifact)
        return OnnxRun(
            spec, base, x, y, cfg, seed, model=model, artifact=artifact, torch=self._torch
        )
