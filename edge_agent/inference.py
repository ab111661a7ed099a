"""On-device inference through onnxruntime, and the logits of any job's model."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from edge_agent.errors import ModelVerifyError
from schemas.artifact import ArtifactError, export_version
from schemas.messages import ModelSpecMsg
from schemas.modelspec import forward
from schemas.types import F32


class OnnxModel:
    """An onnxruntime session over a verified ONNX artifact (single input, logits output)."""

    def __init__(self, session: object, input_name: str, shape: tuple[int, ...] = ()) -> None:
        self._session = session
        self._input = input_name
        self._shape = shape  # per-example input shape when it is not flat ([N, 1, 40], ...)

    @classmethod
    def load(cls, data: bytes) -> OnnxModel:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelVerifyError("onnx_load", f"{type(exc).__name__}: {exc}") from None
        inp = sess.get_inputs()[0]
        dims = tuple(inp.shape[1:])
        shape = dims if len(dims) > 1 and all(isinstance(d, int) for d in dims) else ()
        return cls(sess, inp.name, shape)

    def run(self, x: F32) -> F32:
        """Logits for flat rows ``x[n, n_features]`` (viewed as the graph's input shape)."""
        if self._shape:
            x = np.ascontiguousarray(x, dtype=np.float32).reshape((len(x), *self._shape))
        out = self._session.run(None, {self._input: x})  # type: ignore[attr-defined]
        return np.asarray(out[0], dtype=np.float32)


def logits_fn(spec: ModelSpecMsg, params: F32, artifact: bytes | None) -> Callable[[F32], F32]:
    """Logits of raw feature rows ``x[n, n_features]`` under ``params``: the numpy reference
    forward pass for the built-in families; for an ``onnx`` job onnxruntime on its artifact
    with these weights and the spec's standardisation (``schemas.artifact.export_version``,
    the graph ``latest.onnx`` serves)."""
    if spec.family != "onnx":
        return functools.partial(forward, spec, params)
    if artifact is None:
        raise ModelVerifyError("artifact", "an onnx job's model needs its artifact")
    try:
        data = export_version(artifact, spec, params)
    except ArtifactError as exc:
        raise ModelVerifyError("artifact", f"{exc.code}: {exc.detail}") from None
    return OnnxModel.load(data).run
