"""On-device inference through onnxruntime."""

from __future__ import annotations

import numpy as np

from edge_agent.errors import ModelVerifyError
from schemas.types import F32


class OnnxModel:
    """An onnxruntime session over a verified ONNX artifact (single input, logits output)."""

    def __init__(self, session: object, input_name: str) -> None:
        self._session = session
        self._input = input_name

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
        return cls(sess, sess.get_inputs()[0].name)

    def run(self, x: F32) -> F32:
        out = self._session.run(None, {self._input: x})  # type: ignore[attr-defined]
        return np.asarray(out[0], dtype=np.float32)
