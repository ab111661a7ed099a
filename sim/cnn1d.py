"""The MNIST-1D model: a small 1-D CNN in PyTorch, its ONNX export, and a central trainer.

``make_cnn(seed)`` (importable as ``"sim.cnn1d:make_cnn"``, the ``torch_module`` of a job)
builds ``Cnn1d``: three Conv1d+ReLU layers (the 2nd and 3rd with stride 2: 40 -> 20 -> 10
positions), global average pooling over the positions, then Linear+ReLU and a Linear to
the 10 logits; 102,282 parameters with the defaults. The input is ``[N, 40]`` (CSV rows)
or ``[N, 1, 40]``. Only ops that both torch exporters emit and onnx2torch 1.5 converts
back (Unsqueeze, Conv, Relu, AveragePool, Squeeze, Gemm): no MaxPool (onnx2torch needs
shape info for it), no ``mean()`` (ReduceMean-18 has no onnx2torch converter), no Reshape
(the dynamo exporter writes ``allowzero=1``, which onnx2torch refuses).

``export_onnx(module)`` writes the ONNX bytes with ``torch.onnx.export``: the legacy
TorchScript exporter (``dynamo=False``, opset 17; deprecated but present in torch 2.15)
when it exists, else the dynamo exporter (opset 18, onnxscript). Both name the graph's
float32 initializers exactly like ``module.state_dict()`` (the dynamo one adds int64
constants ``val_*``); the input is ``x`` ``[batch, 40]``, the output ``logits``.

``central_train(train, test, epochs, seed)`` is the reference: the same model on the same
rows, trained centrally with a plain torch loop (Adam), test accuracy after each epoch.

torch is imported lazily: importing this module needs only numpy.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.data import Dataset
from schemas.errors import FedfleetError
from schemas.types import F32

if TYPE_CHECKING:
    from torch import nn

N_FEATURES = 40
N_CLASSES = 10
CHANNELS = (32, 64, 128)
HIDDEN = 512
ATOL = 1e-4  # torch forward vs onnxruntime on the exported graph


class Cnn1dError(FedfleetError):
    """torch missing, an export that fails, or an export that disagrees with torch."""

    code = "cnn1d"


def _torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise Cnn1dError("torch_missing", "the MNIST-1D CNN needs the torch extra") from None


@functools.cache
def _cnn_class() -> type[nn.Module]:
    _torch()  # the typed error when torch is missing
    import torch
    from torch import nn
    from torch.nn import functional as f

    class Cnn1d(nn.Module):
        def __init__(self, channels: tuple[int, int, int] = CHANNELS, hidden: int = HIDDEN):
            super().__init__()
            c1, c2, c3 = channels
            self.conv1 = nn.Conv1d(1, c1, 5, padding=2)
            self.conv2 = nn.Conv1d(c1, c2, 3, stride=2, padding=1)
            self.conv3 = nn.Conv1d(c2, c3, 3, stride=2, padding=1)
            self.fc1 = nn.Linear(c3, hidden)
            self.fc2 = nn.Linear(hidden, N_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 2:
                x = x.unsqueeze(1)
            x = f.relu(self.conv1(x))
            x = f.relu(self.conv2(x))
            x = f.relu(self.conv3(x))
            x = f.avg_pool1d(x, int(x.shape[-1])).squeeze(-1)  # global average pool
            logits: torch.Tensor = self.fc2(f.relu(self.fc1(x)))
            return logits

    Cnn1d.__module__, Cnn1d.__qualname__ = __name__, "Cnn1d"  # picklable as sim.cnn1d.Cnn1d
    return Cnn1d


def __getattr__(name: str) -> Any:  # ``sim.cnn1d.Cnn1d`` without importing torch up front
    if name == "Cnn1d":
        return _cnn_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_cnn(
    seed: int = 0, *, channels: tuple[int, int, int] = CHANNELS, hidden: int = HIDDEN
) -> nn.Module:
    """A fresh ``Cnn1d``, its weights drawn from ``seed`` (torch's default init; the global
    torch RNG is left as it was)."""
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _cnn_class()(channels, hidden)


def num_params(module: nn.Module) -> int:
    return sum(int(p.numel()) for p in module.parameters())


# ------------------------------------------------------------------ ONNX


def export_onnx(
    module: nn.Module, *, n_features: int = N_FEATURES, dynamo: bool | None = None,
    verify: bool = True,
) -> bytes:  # fmt: skip
    """ONNX bytes of ``module`` (input ``x`` ``[batch, n_features]``, output ``logits``).
    ``dynamo``: None tries the legacy exporter and falls back to dynamo; True/False forces
    one. ``verify`` checks onnxruntime against the torch forward on a few random rows
    (``Cnn1dError("mismatch")`` beyond ``ATOL``)."""
    torch = _torch()
    was_training = module.training
    module.eval()
    try:
        example = (torch.zeros(2, n_features),)
        data = None
        if dynamo is not True:
            try:
                data = _export_legacy(torch, module, example)
            except (AttributeError, TypeError, RuntimeError) as exc:
                if dynamo is False:
                    raise Cnn1dError("export", f"legacy ONNX export failed: {exc}") from exc
        if data is None:
            data = _export_dynamo(torch, module, example)
        if verify:
            rows = np.random.default_rng(0).standard_normal((8, n_features)).astype(np.float32)
            diff = max_abs_diff(module, data, rows)
            if not diff <= ATOL:
                raise Cnn1dError("mismatch", f"onnxruntime differs from torch by {diff:.3g}")
        return data
    finally:
        module.train(was_training)


def _export_legacy(torch: Any, module: nn.Module, example: tuple[Any, ...]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript path
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    return buf.getvalue()


def _export_dynamo(torch: Any, module: nn.Module, example: tuple[Any, ...]) -> bytes:
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, example, dynamo=True, opset_version=18,
                                     input_names=["x"], output_names=["logits"],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    except Exception as exc:  # the exporter raises many kinds; all mean "cannot export"
        raise Cnn1dError("export", f"ONNX export failed: {exc}") from exc
    return bytes(prog.model_proto.SerializeToString())


def onnx_logits(data: bytes, x: F32) -> F32:
    """Run the exported graph in onnxruntime (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0], np.float32)


def torch_logits(module: nn.Module, x: F32) -> F32:
    torch = _torch()
    with torch.no_grad():
        return np.asarray(module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy())


def max_abs_diff(module: nn.Module, data: bytes, x: F32) -> float:
    """max |torch forward - onnxruntime| over the rows ``x`` (module in its current mode)."""
    return float(np.max(np.abs(torch_logits(module, x) - onnx_logits(data, x))))


# ------------------------------------------------------------------ central reference


@dataclass(slots=True)
class CentralHistory:
    """Per epoch: test accuracy, mean training loss, training wall time (no evaluation)."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rows: int = 0  # training rows per epoch
    model: Any = None  # the trained module

    @property
    def samples_per_s(self) -> float:
        total = sum(self.seconds)
        return self.rows * len(self.seconds) / total if total > 0 else 0.0


def accuracy(module: nn.Module, ds: Dataset, *, batch: int = 4096) -> float:
    if len(ds) == 0:
        return 0.0
    was_training = module.training
    module.eval()
    try:
        hits = sum(
            int((torch_logits(module, ds.x[i : i + batch]).argmax(1) == ds.y[i : i + batch]).sum())
            for i in range(0, len(ds), batch)
        )
    finally:
        module.train(was_training)
    return hits / len(ds)


def central_train(
    train: Dataset,
    test: Dataset,
    epochs: int = 5,
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    model: nn.Module | None = None,
    threads: int = 1,
    on_epoch: Callable[[CentralHistory], None] | None = None,
) -> CentralHistory:
    """Adam on mean cross-entropy, reshuffled every epoch (order from ``seed``); ``model``
    defaults to ``make_cnn(seed)`` and is trained in place. ``on_epoch(history)`` is called
    after each epoch (``len(history.accuracy)`` epochs done so far).

    ``threads``: torch's intra-op threads for the run (restored afterwards; 0 keeps the
    current setting). One is the default: on a 2-core machine shared with a fleet, two
    spinning OpenMP threads stall each other (steps of 5 to 450 ms) where one thread runs a
    steady ~6 ms per batch of 128."""
    if epochs < 1 or batch_size < 1 or len(train) == 0:
        raise Cnn1dError("", "need epochs >= 1, batch_size >= 1 and training rows")
    torch = _torch()
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _train(torch, train, test, epochs, seed, batch_size, lr, model, on_epoch)
    finally:
        torch.set_num_threads(before)


def _train(
    torch: Any,
    train: Dataset,
    test: Dataset,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    model: nn.Module | None,
    on_epoch: Callable[[CentralHistory], None] | None,
) -> CentralHistory:
    module = make_cnn(seed) if model is None else model
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    gen = torch.Generator().manual_seed(seed)
    hist = CentralHistory(rows=len(train), model=module)
    for _ in range(epochs):
        module.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for i in range(0, len(train), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.item()) * len(idx)
        hist.seconds.append(time.perf_counter() - t0)
        hist.loss.append(total / len(train))
        hist.accuracy.append(accuracy(module, test))
        if on_epoch is not None:
            on_epoch(hist)
    module.eval()
    return hist
