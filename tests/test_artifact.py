"""schemas.artifact: normalisation, weights in and out, the built-in generators, and the
onnx additions to the wire schemas."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from schemas import artifact as art
from schemas.errors import SchemaError
from schemas.messages import ModelSpecMsg, ParamMsg, TrainConfig
from schemas.modelspec import forward, init_params, layout, num_params, unflatten
from schemas.onnx_export import export
from schemas.types import F32

RNG = np.random.default_rng(7)
DIGEST = "sha256:" + "ab" * 32


def _rand(*shape: int) -> F32:
    return RNG.normal(size=shape).astype(np.float32)


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    check: bool = True,
) -> bytes:
    g = helper.make_graph(list(nodes), "t", list(inputs), list(outputs), initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m)
    data: bytes = m.SerializeToString()
    return data


def _vi(name: str, shape: Sequence[int | str | None], dt: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, dt, list(shape))


def _init(name: str, value: np.ndarray[Any, Any]) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def gemm_mlp(f: int = 6, h: int = 5, c: int = 3) -> bytes:
    """input "features" -> Gemm/Relu/Gemm -> "scores" (+ an extra output "hidden")."""
    nodes = [
        helper.make_node("Gemm", ["features", "fc1.weight", "fc1.bias"], ["h0"], transB=1),
        helper.make_node("Relu", ["h0"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "fc2.weight", "fc2.bias"], ["scores"], transB=1),
    ]
    inits = [
        _init("fc1.weight", _rand(h, f)),
        _init("fc1.bias", _rand(h)),
        _init("fc2.weight", _rand(c, h)),
        _init("fc2.bias", _rand(c)),
    ]
    return _model(
        nodes,
        [_vi("features", ["batch", f])],
        [_vi("scores", ["batch", c]), _vi("hidden", ["batch", h])],
        inits,
    )


def conv1d_net(c: int = 4) -> bytes:
    """input [N, 1, 40] -> Conv(k=5) -> Relu -> Reshape [N, 144] -> Gemm -> [N, c]."""
    nodes = [
        helper.make_node("Conv", ["signal", "conv.weight", "conv.bias"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Reshape", ["h1", "flat_shape"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc.weight", "fc.bias"], ["out"], transB=1),
    ]
    inits = [
        _init("conv.weight", _rand(4, 1, 5)),
        _init("conv.bias", _rand(4)),
        _init("flat_shape", np.array([-1, 144], np.int64)),
        _init("fc.weight", _rand(c, 144)),
        _init("fc.bias", _rand(c)),
    ]
    return _model(nodes, [_vi("signal", ["N", 1, 40])], [_vi("out", ["N", c])], inits)


def _run(data: bytes, x: np.ndarray[Any, Any], name: str = "x") -> list[Any]:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out: list[Any] = sess.run(None, {name: x})
    return out


def _softmax(z: F32) -> F32:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: F32 = e / e.sum(axis=1, keepdims=True)
    return out


def _all_names(data: bytes) -> set[str]:
    g = onnx.load_from_string(data).graph
    names = {v.name for v in (*g.input, *g.output, *g.value_info)} | {t.name for t in g.initializer}
    for n in g.node:
        names |= set(n.input) | set(n.output)
    return names


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    ("build", "orig_in", "orig_out", "shape", "n_classes"),
    [(gemm_mlp, "features", "scores", (6,), 3), (conv1d_net, "signal", "out", (1, 40), 4)],
)
def test_normalize_renames_and_keeps_the_graph(
    build: Callable[[], bytes], orig_in: str, orig_out: str, shape: tuple[int, ...], n_classes: int
) -> None:
    raw = build()
    info = art.normalize(raw)
    m = onnx.load_from_string(info.data)
    assert [v.name for v in m.graph.input] == ["x"]
    assert [v.name for v in m.graph.output] == ["logits", "probabilities"]
    assert orig_in not in _all_names(info.data) and orig_out not in _all_names(info.data)
    assert info.input_shape == shape and info.n_features == int(np.prod(shape))
    assert info.n_classes == n_classes
    assert info.digest == art.digest_of(info.data) and info.digest.startswith("sha256:")
    assert [p.name for p in info.params] == [
        t.name
        for t in onnx.load_from_string(raw).graph.initializer
        if t.data_type == TensorProto.FLOAT
    ]
    assert info.num_params == sum(p.size for p in info.params)
    x = _rand(9, *shape)
    logits, probs = _run(info.data, x)
    np.testing.assert_allclose(logits, _run(raw, x, orig_in)[0], atol=1e-6)
    np.testing.assert_allclose(probs, _softmax(logits), atol=1e-6)
    assert art.normalize(info.data).data == info.data  # idempotent


def test_normalize_moves_reserved_names_out_of_the_way() -> None:
    nodes = [
        helper.make_node("MatMul", ["inp", "logits"], ["x"]),  # an initializer named logits
        helper.make_node("Add", ["x", "probabilities"], ["y"]),
    ]
    inits = [_init("logits", _rand(3, 2)), _init("probabilities", _rand(2))]
    raw = _model(nodes, [_vi("inp", ["N", 3])], [_vi("y", ["N", 2])], inits)
    info = art.normalize(raw, trainable=["logits"])
    assert [p.name for p in info.params] == ["logits_1"]
    x = _rand(4, 3)
    np.testing.assert_allclose(_run(info.data, x)[0], _run(raw, x, "inp")[0], atol=1e-6)


def test_normalize_prunes_what_the_logits_do_not_need() -> None:
    nodes = [
        helper.make_node("MatMul", ["inp", "W"], ["z"]),
        helper.make_node("MatMul", ["inp", "unused"], ["side"]),
    ]
    inits = [_init("W", _rand(3, 2)), _init("unused", _rand(3, 5))]
    raw = _model(nodes, [_vi("inp", ["N", 3])], [_vi("z", ["N", 2]), _vi("side", ["N", 5])], inits)
    info = art.normalize(raw)
    assert [p.name for p in info.params] == ["W"]
    assert len(onnx.load_from_string(info.data).graph.node) == 2  # MatMul + Softmax


def test_normalize_trainable_subset_keeps_graph_order_and_constants() -> None:
    raw = gemm_mlp()
    info = art.normalize(raw, trainable=["fc2.bias", "fc1.weight"])
    assert [p.name for p in info.params] == ["fc1.weight", "fc2.bias"]
    assert info.num_params == 5 * 6 + 3


def test_normalize_frees_a_fixed_batch_dim() -> None:
    nodes = [helper.make_node("MatMul", ["inp", "W"], ["z"])]
    raw = _model(nodes, [_vi("inp", [1, 3])], [_vi("z", [1, 2])], [_init("W", _rand(3, 2))])
    info = art.normalize(raw)
    dim0 = onnx.load_from_string(info.data).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"
    assert _run(info.data, _rand(5, 3))[0].shape == (5, 2)


def _bad_models() -> list[tuple[str, bytes, dict[str, Any]]]:
    mm = helper.make_node("MatMul", ["x", "W"], ["z"])
    w = _init("W", _rand(3, 2))
    const_w = helper.make_node("Constant", [], ["W"], value=_init("W", _rand(3, 2)))
    ext = onnx.load_from_string(_model([mm], [_vi("x", ["N", 3])], [_vi("z", ["N", 2])], [w]))
    ext.graph.initializer[0].data_location = TensorProto.EXTERNAL
    z0 = _init("zero", np.zeros(2, np.float32))
    no_out = _model([helper.make_node("Relu", ["x"], ["z"])], [_vi("x", ["N", 3])], [], check=False)
    return [
        ("outputs", no_out, {}),
        ("not_onnx", b"definitely not an onnx file", {}),
        ("not_onnx", b"", {}),
        ("too_large", b"\x00" * 101, {"max_bytes": 100}),
        ("external_data", ext.SerializeToString(), {}),
        ("checker", _model([helper.make_node("Add", ["x", "nope"], ["z"])],
                           [_vi("x", ["N", 2])], [_vi("z", ["N", 2])], check=False), {}),
        ("inputs", _model([helper.make_node("Add", ["x", "y"], ["z"])],
                          [_vi("x", ["N", 2]), _vi("y", ["N", 2])], [_vi("z", ["N", 2])]), {}),
        ("inputs", _model([const_w, helper.make_node("Identity", ["W"], ["z"])], [],
                          [_vi("z", [3, 2])]), {}),
        ("inputs", _model([mm], [_vi("x", ["N", "F"])], [_vi("z", ["N", 2])], [w]), {}),
        ("inputs", _model([helper.make_node("Relu", ["x"], ["z"])], [_vi("x", ["N"])],
                          [_vi("z", ["N"])]), {}),
        ("dtype", _model([helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                          helper.make_node("MatMul", ["xf", "W"], ["z"])],
                         [_vi("x", ["N", 3], TensorProto.DOUBLE)], [_vi("z", ["N", 2])], [w]), {}),
        ("dtype", _model([mm, helper.make_node("Cast", ["z"], ["zd"], to=TensorProto.DOUBLE)],
                         [_vi("x", ["N", 3])], [_vi("zd", ["N", 2], TensorProto.DOUBLE)], [w]), {}),
        ("outputs", _model([helper.make_node("Relu", ["x"], ["z"])], [_vi("x", ["N", 2, 2])],
                           [_vi("z", ["N", 2, 2])]), {}),
        ("outputs", _model([helper.make_node("MatMul", ["x", "W1"], ["z"])], [_vi("x", ["N", 3])],
                           [_vi("z", ["N", 1])], [_init("W1", _rand(3, 1))]), {}),
        ("outputs", _model([helper.make_node("MatMul", ["x", "W1"], ["z"])], [_vi("x", ["N", 3])],
                           [_vi("z", ["N", "C"])], [_init("W1", _rand(3, 1))]), {}),
        ("trainable", _model([const_w, mm], [_vi("x", ["N", 3])], [_vi("z", ["N", 2])]), {}),
        ("trainable", _model([mm], [_vi("x", ["N", 3])], [_vi("z", ["N", 2])], [w]),
         {"trainable": ["nope"]}),
        ("trainable", conv1d_net(), {"trainable": ["flat_shape"]}),
        ("trainable", _model([mm], [_vi("x", ["N", 3])], [_vi("z", ["N", 2])], [w]),
         {"trainable": []}),
        ("probe", _model([helper.make_node("Mul", ["x", "zero"], ["m"]),
                          helper.make_node("Log", ["m"], ["z"])],
                         [_vi("x", ["N", 2])], [_vi("z", ["N", 2])], [z0]), {}),
        ("probe", _model([helper.make_node("Reshape", ["x", "s"], ["r"]),
                          helper.make_node("MatMul", ["r", "W"], ["z"])],
                         [_vi("x", ["N", 3])], [_vi("z", ["N", 2])],
                         [_init("s", np.array([1, 3], np.int64)), w]), {}),
        ("too_large", _model([mm], [_vi("x", ["N", 3])], [_vi("z", ["N", 2])], [w]),
         {"max_params": 5}),
    ]  # fmt: skip


@pytest.mark.parametrize(("code", "data", "kw"), _bad_models())
def test_normalize_rejects_with_a_typed_code(code: str, data: bytes, kw: dict[str, Any]) -> None:
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(data, **kw)
    assert err.value.code == code, err.value
    assert err.value.detail and code in art.CODES
    assert isinstance(err.value, SchemaError) and str(err.value).startswith(code + ": ")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_normalize_never_leaks_a_raw_exception(data: st.DataObject) -> None:
    raw = bytearray(gemm_mlp(3, 2, 2))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        art.normalize(bytes(raw[:cut]))
    except art.ArtifactError as exc:
        assert exc.code in art.CODES


# --------------------------------------------------------------------------- torch export


class _Net:  # built lazily: torch is optional
    @staticmethod
    def make() -> Any:
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv1d(1, 4, 5)
                self.fc = torch.nn.Linear(4 * 36, 3)

            def forward(self, x: Any) -> Any:
                return self.fc(torch.relu(self.conv(x)).flatten(1))

        torch.manual_seed(0)
        return Net().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_export_normalises_with_state_dict_names(dynamo: bool, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = _Net.make()
    path = tmp_path / "net.onnx"
    kw: dict[str, Any] = (
        {"dynamic_shapes": ({0: torch.export.Dim("B")},), "external_data": False}
        if dynamo
        else {"dynamic_axes": {"inp": {0: "B"}, "out": {0: "B"}}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated
        torch.onnx.export(
            net, (torch.zeros(2, 1, 40),), str(path), dynamo=dynamo, input_names=["inp"],
            output_names=["out"], verbose=False, **kw,
        )  # fmt: skip
    info = art.normalize(path.read_bytes())
    state = net.state_dict()
    assert [p.name for p in info.params] == list(state)  # the exporters keep the names
    assert [p.shape for p in info.params] == [tuple(v.shape) for v in state.values()]
    assert info.input_shape == (1, 40) and info.n_classes == 3
    flat = np.concatenate([v.numpy().ravel() for v in state.values()]).astype(np.float32)
    np.testing.assert_array_equal(art.initial_flat(info.data, info.params), flat)
    # new weights through with_weights == the torch module with those weights
    new = _rand(flat.size)
    off = 0
    with torch.no_grad():
        for v in net.state_dict().values():
            v.copy_(torch.from_numpy(new[off : off + v.numel()].reshape(v.shape)))
            off += v.numel()
        x = _rand(6, 1, 40)
        want = net(torch.from_numpy(x)).numpy()
    got = _run(art.with_weights(info.data, info.params, new), x)[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------- with_weights


def _flat_strategy(n: int) -> st.SearchStrategy[F32]:
    floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    return st.lists(floats, min_size=n, max_size=n).map(lambda v: np.asarray(v, np.float32))


_MLP = art.normalize(gemm_mlp())
_CONV = art.normalize(conv1d_net())


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([_MLP, _CONV]).flatmap(
        lambda i: st.tuples(st.just(i), _flat_strategy(i.num_params))
    )
)
def test_with_weights_round_trips(case: tuple[art.ArtifactInfo, F32]) -> None:
    info, flat = case
    out = art.with_weights(info.data, info.params, flat)
    np.testing.assert_array_equal(art.initial_flat(out, info.params), flat)
    m = onnx.load_from_string(out)
    assert [v.name for v in m.graph.input] == ["x"]
    assert [v.name for v in m.graph.output] == ["logits", "probabilities"]


def test_with_weights_only_touches_trainables() -> None:
    sub = art.normalize(conv1d_net(), trainable=["fc.weight", "fc.bias"])
    flat = _rand(sub.num_params)
    out = onnx.load_from_string(art.with_weights(sub.data, sub.params, flat))
    before = {
        t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(sub.data).graph.initializer
    }
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for name in ("conv.weight", "conv.bias", "flat_shape"):
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(after["fc.bias"], flat[-4:])


@pytest.mark.parametrize(
    ("params", "flat", "code"),
    [
        (_MLP.params, np.zeros(_MLP.num_params + 1, np.float32), "shape"),
        (_MLP.params, np.zeros((1, _MLP.num_params), np.float32), "shape"),
        (_MLP.params, np.zeros(_MLP.num_params, np.int64), "shape"),
        ((ParamMsg("nope", (3,)),), np.zeros(3, np.float32), "trainable"),
        ((ParamMsg("fc2.bias", (4,)),), np.zeros(4, np.float32), "shape"),
        (
            (ParamMsg("fc2.bias", (3,)), ParamMsg("fc2.bias", (3,))),
            np.zeros(6, np.float32),
            "shape",
        ),
    ],
)
def test_with_weights_rejects(params: tuple[ParamMsg, ...], flat: F32, code: str) -> None:
    with pytest.raises(art.ArtifactError) as err:
        art.with_weights(_MLP.data, params, flat)
    assert err.value.code == code


def test_with_weights_rejects_non_float_initializer() -> None:
    with pytest.raises(art.ArtifactError) as err:
        art.with_weights(_CONV.data, (ParamMsg("flat_shape", (2,)),), np.zeros(2, np.float32))
    assert err.value.code == "dtype"


@pytest.mark.parametrize("info", [_MLP, _CONV], ids=["mlp", "conv"])
def test_with_weights_standardises_a_raw_input(info: art.ArtifactInfo) -> None:
    n = info.n_features
    mean, std = _rand(n), np.abs(_rand(n)) + 0.5
    flat = _rand(info.num_params)
    plain = art.with_weights(info.data, info.params, flat)
    std_model = art.with_weights(info.data, info.params, flat, input_mean=mean, input_std=std)
    g = onnx.load_from_string(std_model).graph
    assert [v.name for v in g.input] == ["x"] and [node.op_type for node in g.node[:2]] == [
        "Sub",
        "Div",
    ]
    x = _rand(5, *info.input_shape)
    xs = ((x.reshape(5, n) - mean) / std).reshape(x.shape).astype(np.float32)
    np.testing.assert_allclose(_run(std_model, x)[0], _run(plain, xs)[0], atol=1e-4)
    for bad_mean, bad_std in ((mean[:-1], std[:-1]), (mean, -std)):
        with pytest.raises(art.ArtifactError) as err:
            art.with_weights(info.data, info.params, flat, input_mean=bad_mean, input_std=bad_std)
        assert err.value.code == "standardize"


# --------------------------------------------------------------------------- built-in families

BUILTINS = [
    ModelSpecMsg(family="softmax", n_features=7, n_classes=3),
    ModelSpecMsg(family="mlp", n_features=7, n_classes=4, hidden=5),
    ModelSpecMsg(
        family="mlp",
        n_features=4,
        n_classes=3,
        hidden=6,
        input_mean=(1.0, -2.0, 0.5, 3.0),
        input_std=(2.0, 0.5, 1.0, 4.0),
    ),
    ModelSpecMsg(
        family="softmax",
        n_features=3,
        n_classes=2,
        input_mean=(0.1, 0.2, 0.3),
        input_std=(1.5, 2.5, 0.25),
    ),
]


@pytest.mark.parametrize("spec", BUILTINS)
def test_export_version_of_a_builtin_matches_forward_and_export(spec: ModelSpecMsg) -> None:
    base = art.builtin_artifact(spec, seed=3)
    assert base == art.builtin_artifact(spec, seed=3)  # deterministic bytes
    np.testing.assert_array_equal(art.initial_params(spec, 3, None), init_params(spec, 3))
    np.testing.assert_array_equal(art.initial_params(spec, 3, base), init_params(spec, 3))
    flat = _rand(num_params(spec))
    version = art.export_version(base, spec, flat)
    x = _rand(11, spec.n_features) * 3
    got_logits, got_probs = _run(version, x)
    want_logits, want_probs = _run(export(spec, flat), x)
    np.testing.assert_allclose(got_logits, forward(spec, flat, x), atol=1e-5)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(got_probs, want_probs, atol=1e-5)


def test_builtin_artifact_refuses_onnx() -> None:
    spec = art.spec_for(_MLP)
    with pytest.raises(art.ArtifactError) as err:
        art.builtin_artifact(spec, 0)
    assert err.value.code == "family"


# --------------------------------------------------------------------------- onnx specs


def test_spec_for_and_onnx_family_paths() -> None:
    spec = art.spec_for(_CONV, labels=("a", "b", "c", "d"), torch_module="pkg.mod:make")
    assert spec.family == "onnx" and spec.artifact == _CONV.digest and spec.n_features == 40
    assert hash(spec) == hash(
        msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=ModelSpecMsg)
    )
    assert [t.name for t in layout(spec)] == [p.name for p in spec.params]
    assert num_params(spec) == _CONV.num_params
    flat = art.initial_params(spec, 0, _CONV.data)
    np.testing.assert_array_equal(flat, art.initial_flat(_CONV.data, spec.params))
    assert unflatten(spec, flat)["conv.weight"].shape == (4, 1, 5)
    calls: list[Callable[[], object]] = [
        lambda: init_params(spec),
        lambda: forward(spec, flat, _rand(2, 40)),
    ]
    for call in calls:
        with pytest.raises(art.ArtifactError) as err:
            call()
        assert err.value.code == "artifact" and isinstance(err.value, SchemaError)
    with pytest.raises(art.ArtifactError) as err:
        art.initial_params(spec, 0, None)
    assert err.value.code == "artifact"
    with pytest.raises(art.ArtifactError) as err:
        art.initial_params(spec, 0, _MLP.data)
    assert err.value.code == "digest"
    with pytest.raises(art.ArtifactError) as err:
        art.export_version(_MLP.data, spec, flat)
    assert err.value.code == "digest"
    # export_version of an onnx spec with standardisation
    std_spec = art.spec_for(_CONV, input_mean=tuple(range(40)), input_std=(2.0,) * 40)
    x = _rand(3, 1, 40)
    plain = art.export_version(_CONV.data, spec, flat)
    xs = ((x.reshape(3, 40) - np.arange(40)) / 2.0).reshape(3, 1, 40).astype(np.float32)
    np.testing.assert_allclose(
        _run(art.export_version(_CONV.data, std_spec, flat), x)[0], _run(plain, xs)[0], atol=1e-4
    )


_P = (ParamMsg("w", (3, 2)),)


@pytest.mark.parametrize(
    "kw",
    [
        {"family": "onnx", "n_features": 3, "n_classes": 2, "params": _P, "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": "sha256:abc",
         "params": _P, "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST.upper(),
         "params": _P, "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST,
         "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST, "params": _P},
        {"family": "onnx", "n_features": 4, "n_classes": 2, "artifact": DIGEST, "params": _P,
         "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST, "params": _P,
         "input_shape": (3, 0)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST,
         "params": _P + _P, "input_shape": (3,)},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST, "params": _P,
         "input_shape": (3,), "torch_module": "not a module"},
        {"family": "onnx", "n_features": 3, "n_classes": 2, "artifact": DIGEST, "params": _P,
         "input_shape": (3,), "hidden": 4},
        {"family": "softmax", "n_features": 3, "n_classes": 2, "artifact": DIGEST},
        {"family": "mlp", "n_features": 3, "n_classes": 2, "hidden": 2, "params": _P},
        {"family": "softmax", "n_features": 3, "n_classes": 2, "input_shape": (3,)},
        {"family": "softmax", "n_features": 3, "n_classes": 2, "torch_module": "a:b"},
    ],
)  # fmt: skip
def test_model_spec_rejects_bad_onnx_fields(kw: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        ModelSpecMsg(**kw)
    with pytest.raises((SchemaError, msgspec.ValidationError)):
        msgspec.msgpack.decode(msgspec.msgpack.encode(kw), type=ModelSpecMsg)


def test_model_spec_onnx_ok_and_param_msg() -> None:
    spec = ModelSpecMsg(
        family="onnx", n_features=6, n_classes=2, artifact=DIGEST,
        params=(ParamMsg("w", (6, 2)), ParamMsg("s", ())), input_shape=(2, 3),
        torch_module="my_pkg.models:build",
    )  # fmt: skip
    assert num_params(spec) == 13 and spec.params[1].size == 1
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=ModelSpecMsg) == spec
    for bad in ((0,), (2, -1)):
        with pytest.raises(SchemaError):
            ParamMsg("w", bad)
    with pytest.raises(SchemaError):
        ParamMsg("", (1,))


def test_train_config_additions() -> None:
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.momentum, cfg.loss, cfg.weight_decay) == (
        "sgd", 0.9, "cross_entropy", 0.0,
    )  # fmt: skip
    cfg = msgspec.msgpack.decode(
        msgspec.msgpack.encode({"optimizer": "adam", "loss": "mse", "weight_decay": 1e-4}),
        type=TrainConfig,
    )
    assert (cfg.optimizer, cfg.loss, cfg.weight_decay) == ("adam", "mse", 1e-4)
    bads: list[dict[str, Any]] = [{"momentum": 1.0}, {"momentum": -0.1}, {"weight_decay": -1.0}]
    for bad in bads:
        with pytest.raises(SchemaError):
            TrainConfig(**bad)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"optimizer": "rmsprop"}), type=TrainConfig)


def test_corrupt_initializer_and_string_trainable_are_typed_errors() -> None:
    m = onnx.load_from_string(_MLP.data)
    m.graph.initializer[0].raw_data = b"abc"
    with pytest.raises(art.ArtifactError) as err:
        art.initial_flat(m.SerializeToString(), _MLP.params)
    assert err.value.code == "shape"
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(m.SerializeToString())
    assert err.value.code == "checker"
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(_MLP.data, trainable="fc1.weight")
    assert err.value.code == "trainable"
