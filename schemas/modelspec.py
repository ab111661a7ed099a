"""Built-in model families and their flat float32 parameter layout.

The flat vector is the unit of sharding and of every update. Layout (C order):

* ``softmax``: ``W[n_features, n_classes]`` then ``b[n_classes]``.
* ``mlp``: ``W1[n_features, hidden]``, ``b1[hidden]``, ``W2[hidden, n_classes]``,
  ``b2[n_classes]`` with ReLU between the layers.
* ``onnx``: the tensors of ``spec.params`` (the artifact's trainable initializers), in
  order; see ``schemas.artifact``.

Input standardisation is part of the model, not of the data: when ``spec.input_mean`` is
set, the model first computes ``x' = (x - input_mean) / input_std`` (``standardize``), so
devices and on-device inference always take raw features. It is not in the flat vector.

``forward`` is the numpy reference forward pass of the built-in families; the ONNX export
and the on-device trainers must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.errors import SchemaError
from schemas.messages import ModelSpecMsg
from schemas.types import F32


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layout(spec: ModelSpecMsg) -> list[Tensor]:
    """Named tensors of the flat vector, in order."""
    if spec.family == "softmax":
        shapes = [("W", (spec.n_features, spec.n_classes)), ("b", (spec.n_classes,))]
    elif spec.family == "mlp":
        if spec.hidden < 1:
            raise SchemaError("shape", "mlp needs hidden >= 1")
        h = spec.hidden
        shapes = [
            ("W1", (spec.n_features, h)),
            ("b1", (h,)),
            ("W2", (h, spec.n_classes)),
            ("b2", (spec.n_classes,)),
        ]
    elif spec.family == "onnx":
        shapes = [(p.name, p.shape) for p in spec.params]
    else:  # pragma: no cover - guarded by the schema Literal
        raise SchemaError("type", f"unknown family {spec.family}")
    out: list[Tensor] = []
    off = 0
    for name, shape in shapes:
        t = Tensor(name, shape, off)
        out.append(t)
        off += t.size
    return out


def num_params(spec: ModelSpecMsg) -> int:
    last = layout(spec)[-1]
    return last.offset + last.size


def unflatten(spec: ModelSpecMsg, flat: F32) -> dict[str, F32]:
    """Views (no copies) of the named tensors inside ``flat``."""
    n = num_params(spec)
    if flat.shape != (n,):
        raise SchemaError("shape", f"expected {n} parameters, got shape {flat.shape}")
    return {t.name: flat[t.offset : t.offset + t.size].reshape(t.shape) for t in layout(spec)}


def _builtin_only(spec: ModelSpecMsg, what: str) -> None:
    if spec.family == "onnx":
        from schemas.artifact import ArtifactError  # the error lives with the artifact code

        raise ArtifactError("artifact", f"{what} of an onnx model needs its artifact")


def init_params(spec: ModelSpecMsg, seed: int = 0) -> F32:
    """Deterministic initial parameters: zeros for softmax, scaled normal for MLP weights.

    Built-in families only: an ``onnx`` model's initial values are its artifact's
    (``schemas.artifact.initial_params`` works for every family)."""
    _builtin_only(spec, "init_params")
    flat = np.zeros(num_params(spec), dtype=np.float32)
    if spec.family == "mlp":
        rng = np.random.default_rng(seed)
        for t in layout(spec):
            if t.name.startswith("W"):
                fan_in = t.shape[0]
                w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=t.size).astype(np.float32)
                flat[t.offset : t.offset + t.size] = w
    return flat


def standardize(spec: ModelSpecMsg, x: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """``(x - input_mean) / input_std`` in the dtype of ``x`` (float32 unless float64); ``x``
    itself when the spec has no standardisation."""
    if not spec.input_mean:
        return x
    dt: type[np.floating] = np.float64 if x.dtype == np.float64 else np.float32
    mean = np.asarray(spec.input_mean, dtype=dt)
    std = np.asarray(spec.input_std, dtype=dt)
    out: npt.NDArray[np.floating] = np.divide(np.subtract(np.asarray(x, dtype=dt), mean), std)
    return out


def forward(spec: ModelSpecMsg, flat: F32, x: F32) -> F32:
    """Logits for a batch of raw features ``x[n, n_features]`` (standardised first when the
    spec says so). Built-in families only: an ``onnx`` model runs in onnxruntime on
    ``schemas.artifact.export_version``."""
    _builtin_only(spec, "forward")
    p = unflatten(spec, flat)
    xs = standardize(spec, x)
    if spec.family == "softmax":
        return (xs @ p["W"] + p["b"]).astype(np.float32)
    h: F32 = np.maximum(xs @ p["W1"] + p["b1"], np.float32(0.0))
    out: F32 = (h @ p["W2"] + p["b2"]).astype(np.float32)
    return out


def even_bounds(n: int, shards: int) -> list[int]:
    """Cut ``n`` parameters into ``shards`` contiguous slices of near-equal size."""
    if shards < 1 or shards > n:
        raise SchemaError("shape", f"cannot cut {n} parameters into {shards} shards")
    return [(n * i) // shards for i in range(shards + 1)]
