"""ONNX export of the built-in model families with the ``onnx`` helper API.

Graph: input ``x`` float32 ``[N, n_features]`` (raw features) -> outputs ``logits`` and
``probabilities`` (softmax over classes). Weights are initializers taken from the flat
vector with the layout of ``schemas.modelspec``. A spec with ``input_mean`` gets
``Sub(x, input_mean)`` and ``Div(., input_std)`` in front of the first layer (initializers
``input_mean``/``input_std``), exactly ``schemas.modelspec.standardize``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from schemas.messages import ModelSpecMsg
from schemas.modelspec import unflatten
from schemas.types import F32

OPSET = 17


def export(spec: ModelSpecMsg, flat: F32, *, name: str = "fedfleet") -> bytes:
    """Serialized ONNX model equal to ``schemas.modelspec.forward`` (checked by onnx)."""
    p = unflatten(spec, np.ascontiguousarray(flat, dtype=np.float32))
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), name=k) for k, v in p.items()]
    nodes: list[onnx.NodeProto] = []
    x = "x"
    if spec.input_mean:
        for key, values in (("input_mean", spec.input_mean), ("input_std", spec.input_std)):
            inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name=key))
        nodes += [
            helper.make_node("Sub", ["x", "input_mean"], ["x_centered"]),
            helper.make_node("Div", ["x_centered", "input_std"], ["x_std"]),
        ]
        x = "x_std"
    if spec.family == "softmax":
        nodes += [
            helper.make_node("MatMul", [x, "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", [x, "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["hw"]),
            helper.make_node("Add", ["hw", "b2"], ["logits"]),
        ]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.n_features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.n_classes]),
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["N", spec.n_classes]
            ),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedfleet"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
