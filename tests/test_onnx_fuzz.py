"""Mutation fuzzing of ``schemas.artifact.normalize``, the entry point of every uploaded ONNX
file: each case either normalises or raises ``ArtifactError`` with a known code — never
another exception, never a crash of the process, never a hang.

Seeds are valid models built here (a Gemm/Relu/Softmax MLP, a Conv1d net, the built-in
families' artifacts, models with named trainable subsets, a Constant node, an ``If``
subgraph). Mutations work on the protobuf (drop/duplicate/reorder nodes, dangling names,
dtypes, dims, initializers, opsets, unknown ops, cycles, subgraphs, external data, size and
raw-data lies, NaN/Inf, shape and loop bombs) and on the bytes (flip, truncate, splice,
random). The CI run is bounded by a case count; the documented long run (BENCHMARKS.md)::

    FEDFLEET_FUZZ_CASES=100000 FEDFLEET_FUZZ_SEED=7 .venv/bin/pytest -q tests/test_onnx_fuzz.py

The focused tests below it pin each hole the fuzzer (or its review) found.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from schemas import artifact as art
from schemas.messages import ModelSpecMsg
from tests.test_artifact import conv1d_net, gemm_mlp

CASES = int(os.environ.get("FEDFLEET_FUZZ_CASES", "600"))
SEED = int(os.environ.get("FEDFLEET_FUZZ_SEED", "20261204"))
PROBE_TIMEOUT_S = 2.0  # the fuzzer's loop bombs hit it; real models probe in milliseconds

Seed = tuple[str, bytes, list[str] | None]  # (name, ONNX bytes, trainable names)


# --------------------------------------------------------------------------- seeds


def _vi(name: str, shape: Sequence[int | str | None], dt: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, dt, list(shape))


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype("f4"), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any],
           inits: Sequence[TensorProto] = (), opset: int = 17) -> bytes:  # fmt: skip
    g = helper.make_graph(nodes, "seed", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    out: bytes = m.SerializeToString()
    return out


def _with_constant() -> bytes:
    """x [N, 4] -> MatMul(Constant W) -> Add(b) -> [N, 3] (only b trainable)."""
    nodes = [helper.make_node("Constant", [], ["W"], value=_w("Wc", 4, 3)),
             helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("Add", ["z", "b"], ["y"])]  # fmt: skip
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [_w("b", 3)])


def _with_if() -> bytes:
    """An ``If`` on a constant flag whose branches read an outer-scope initializer."""
    branch = [helper.make_graph([helper.make_node(op, ["z"], [f"o_{op}"])], f"b_{op}", [],
                                [_vi(f"o_{op}", ["N", 2])]) for op in ("Relu", "Neg")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["inp", "W"], ["z"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch[0],
                              else_branch=branch[1])]  # fmt: skip
    flag = numpy_helper.from_array(np.array(True), "flag")
    return _model(
        nodes, [_vi("inp", ["batch", 3])], [_vi("y", ["batch", 2])], [_w("W", 3, 2), flag]
    )


def _fixed_batch_3d() -> bytes:
    """x [1, 2, 3] (a fixed batch dim) -> Flatten -> Gemm -> [1, 4]."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"])]  # fmt: skip
    return _model(nodes, [_vi("x", [1, 2, 3])], [_vi("y", [1, 4])], [_w("W", 6, 4), _w("b", 4)])


def seeds() -> list[Seed]:
    out: list[Seed] = [
        ("gemm_mlp", gemm_mlp(6, 5, 3), None),
        ("gemm_mlp_subset", gemm_mlp(4, 3, 2), ["fc2.weight", "fc1.bias"]),
        ("conv1d", conv1d_net(4), None),
        ("conv1d_subset", conv1d_net(3), ["fc.weight"]),
        ("constant", _with_constant(), None),
        ("if", _with_if(), ["W"]),
        ("fixed_batch", _fixed_batch_3d(), None),
    ]
    for spec in (ModelSpecMsg(family="softmax", n_features=5, n_classes=3),
                 ModelSpecMsg(family="mlp", n_features=5, n_classes=3, hidden=8)):  # fmt: skip
        out.append((f"builtin_{spec.family}", art.builtin_artifact(spec, seed=1), None))
    return out


# --------------------------------------------------------------------------- mutations

DTYPES = [TensorProto.FLOAT16, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.STRING,
          TensorProto.BOOL, TensorProto.UINT8, TensorProto.BFLOAT16, 0, 9999]  # fmt: skip
DIMS = [0, -1, 1, 2, 7, 2**31, 2**40, 2**62]
NAMES = ["", "nowhere", "x", "logits", "probabilities", "x" * 300, "a/../../b", "\x00"]
OPS = [("Relu", ""), ("Frobnicate", ""), ("Relu", "com.evil"), ("Gemm", "ai.onnx.ml"),
       ("Softmax", ""), ("Identity", ""), ("Loop", ""), ("Scan", ""), ("NonZero", "")]  # fmt: skip
Mut = Callable[[random.Random, onnx.ModelProto, Path], None]


def _pick(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[rng.randrange(len(seq))] if len(seq) else None


def _graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            for sg in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                out += _graphs(sg)
    return out


def _some_graph(rng: random.Random, m: onnx.ModelProto) -> onnx.GraphProto:
    g: onnx.GraphProto = _pick(rng, _graphs(m.graph))
    return g


def _tensors(m: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor in the model: initializers, sparse parts, attribute values, subgraphs."""
    out: list[TensorProto] = []
    for g in _graphs(m.graph):
        out += list(g.initializer)
        for s in g.sparse_initializer:
            out += [s.values, s.indices]
        for n in g.node:
            for a in n.attribute:
                out += [a.t] if a.type == AttributeProto.TENSOR else list(a.tensors)
    return out


def m_drop_node(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    g = _some_graph(rng, m)
    if g.node:
        del g.node[rng.randrange(len(g.node))]


def m_dup_node(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    g = _some_graph(rng, m)
    if g.node:
        g.node.add().CopyFrom(_pick(rng, g.node))


def m_shuffle_nodes(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def m_dangling(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    g = _some_graph(rng, m)
    where = rng.choice(["in", "out", "ginput", "goutput", "init"])
    name = _pick(rng, NAMES)
    if where in ("in", "out") and g.node:
        n = _pick(rng, g.node)
        slots = n.input if where == "in" else n.output
        if slots:
            slots[rng.randrange(len(slots))] = name
    elif where == "ginput" and g.input:
        _pick(rng, g.input).name = name
    elif where == "goutput" and g.output:
        _pick(rng, g.output).name = name
    elif g.initializer:
        _pick(rng, g.initializer).name = name


def m_dtype(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    dt = _pick(rng, DTYPES)
    if rng.random() < 0.5 and m.graph.initializer:
        _pick(rng, m.graph.initializer).data_type = dt
    else:
        vs = [*m.graph.input, *m.graph.output]
        if vs:
            _pick(rng, vs).type.tensor_type.elem_type = dt


def m_dims(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    if rng.random() < 0.5 and m.graph.initializer:
        t = _pick(rng, m.graph.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = _pick(rng, DIMS)
        else:
            t.dims.append(_pick(rng, DIMS))
        return
    vs = [*m.graph.input, *m.graph.output]
    if not vs:
        return
    dims = _pick(rng, vs).type.tensor_type.shape.dim
    op = rng.random()
    if op < 0.2:
        dims.add().dim_value = _pick(rng, DIMS)
    elif op < 0.3 and dims:
        del dims[rng.randrange(len(dims))]
    elif dims:
        d = dims[rng.randrange(len(dims))]
        if rng.random() < 0.3:
            d.dim_param = _pick(rng, ["N", "F", "", "?"])
        else:
            d.dim_value = _pick(rng, DIMS)


def m_initializers(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    inits = m.graph.initializer
    if not inits:
        return
    if rng.random() < 0.5:
        del inits[rng.randrange(len(inits))]
    else:
        inits.add().CopyFrom(_pick(rng, inits))


def m_opset(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    op = rng.random()
    if op < 0.3:
        del m.opset_import[:]
    elif not m.opset_import:
        return
    elif op < 0.6:
        m.opset_import[0].version = _pick(rng, [0, 1, 6, 10, 11, 26, 1000, -3])
    elif op < 0.8:
        m.opset_import[0].domain = _pick(rng, ["com.evil", "ai.onnx.ml", "ai.onnx"])
    else:
        m.ir_version = _pick(rng, [0, 1, 3, 11, 99, -1])


def m_unknown_op(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    g = _some_graph(rng, m)
    if g.node:
        n = _pick(rng, g.node)
        n.op_type, n.domain = _pick(rng, OPS)


def m_cycle(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    g = m.graph
    if len(g.node) >= 2:
        first, last = g.node[0], g.node[len(g.node) - 1]
        if first.input and last.output:
            first.input[0] = last.output[0]


def m_empty(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    if rng.random() < 0.5:
        del m.graph.node[:]
    else:
        m.ClearField("graph")


def m_nest(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    """Move the graph's last node into an If (or Loop) subgraph, possibly several deep."""
    g = m.graph
    if not g.node:
        return
    last = g.node[len(g.node) - 1]
    inner = onnx.NodeProto()
    inner.CopyFrom(last)
    for depth in range(rng.choice([1, 1, 2, 40])):
        outs = [f"{o}_in" for o in inner.output] or ["o"]
        body = helper.make_graph([inner], "sub", [], [_vi(o, ["N", None]) for o in outs])
        rename = helper.make_node("Identity", [inner.output[0] if inner.output else "o"], [outs[0]])
        body.node.append(rename)
        other = body if depth == 0 else helper.make_graph([], "empty", [], [])  # not 2**depth
        try:
            inner = helper.make_node("If", ["flag"], list(last.output), then_branch=body,
                                     else_branch=other)  # fmt: skip
        except DecodeError:  # protobuf's own nesting limit (100): the parser refuses it too
            break
    g.initializer.append(numpy_helper.from_array(np.array(rng.random() < 0.5), "flag"))
    last.CopyFrom(inner)


def _loop_body(dims: list[int]) -> onnx.GraphProto:
    """A Loop body that passes its condition and one carried tensor through."""
    nodes = [helper.make_node("Identity", [v], [f"{v}_out"]) for v in ("c", "v")]
    ins = [_vi("i", [], TensorProto.INT64), _vi("c", [], TensorProto.BOOL), _vi("v", dims)]
    outs = [_vi("c_out", [], TensorProto.BOOL), _vi("v_out", dims)]
    return helper.make_graph(nodes, "body", ins, outs)


def m_loop_bomb(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    """Route the first trainable initializer through a Loop with a huge trip count."""
    g = m.graph
    ws = [t for t in g.initializer if t.data_type == TensorProto.FLOAT and t.dims]
    if not ws:
        return
    w = ws[0]
    body = _loop_body(list(w.dims))
    for n in g.node:
        for i, v in enumerate(n.input):
            if v == w.name:
                n.input[i] = "w_looped"
    trips = rng.choice([2**62, 2**40, 3])
    g.initializer.extend([numpy_helper.from_array(np.array(trips, np.int64), "trips"),
                          numpy_helper.from_array(np.array(True), "go")])  # fmt: skip
    g.node.insert(0, helper.make_node("Loop", ["trips", "go", w.name], ["w_looped"], body=body))


def m_shape_bomb(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    """Add ConstantOfShape/Expand of a huge shape whose sum is added to the logits."""
    g = m.graph
    if not g.output or not g.node:
        return
    n = rng.choice([2**16, 2**20, 2**31, 2**40])
    out = g.output[0].name
    g.initializer.append(numpy_helper.from_array(np.array([n, n], np.int64), "bomb_shape"))
    one = numpy_helper.from_array(np.ones(1, np.float32))
    for node in g.node:
        for i, o in enumerate(node.output):
            if o == out:
                node.output[i] = "pre_bomb"
    g.node.extend([
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], value=one),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
        helper.make_node("Add", ["pre_bomb", "bomb_sum"], [out]),
    ])  # fmt: skip


def m_external(rng: random.Random, m: onnx.ModelProto, tmp: Path) -> None:
    """Point a tensor (anywhere in the model) at a file that really exists."""
    ts = _tensors(m)
    if not ts:
        return
    t = _pick(rng, ts)
    if rng.random() < 0.7:
        t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    loc = rng.choice([str(tmp / "secret.bin"), "secret.bin", "../secret.bin", "/etc/passwd"])
    for k, v in (("location", loc), ("offset", "0"), ("length", str(rng.choice([4, 24, 2**40])))):
        e = t.external_data.add()
        e.key, e.value = k, v
    if rng.random() < 0.7:
        t.ClearField("raw_data")
        t.ClearField("float_data")


def m_sparse_external(rng: random.Random, m: onnx.ModelProto, tmp: Path) -> None:
    """Add a sparse initializer with external values and read it from the graph."""
    g = m.graph
    if not g.node or not g.node[0].input:
        return
    vals = numpy_helper.from_array(np.ones(4, np.float32), "sp_vals")
    vals.ClearField("raw_data")
    vals.data_location = TensorProto.EXTERNAL
    e = vals.external_data.add()
    e.key, e.value = "location", rng.choice(["secret.bin", str(tmp / "secret.bin")])
    idx = numpy_helper.from_array(np.arange(4, dtype=np.int64), "sp_idx")
    g.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, [4]))
    g.node.insert(0, helper.make_node("Identity", ["sp_vals"], ["sp_out"]))


def m_size_lie(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    """Declared dims that do not match the data: huge dims on small raw_data, or a
    raw_data / float_data / int64_data of the wrong length."""
    ts = _tensors(m)
    if not ts:
        return
    t = _pick(rng, ts)
    op = rng.random()
    if op < 0.3:
        del t.dims[:]
        t.dims.extend(rng.choice([[2**40], [2**20, 2**20], [2**31, 2**31, 2**31], [-5]]))
    elif op < 0.6 and t.raw_data:
        cut = rng.randrange(len(t.raw_data) + 1)
        t.raw_data = t.raw_data[:cut] if rng.random() < 0.5 else t.raw_data + b"\x00" * cut
    elif op < 0.8:
        t.ClearField("raw_data")
        t.float_data.extend([1.0] * rng.choice([0, 1, 3, 1000]))
    else:
        t.int64_data.extend([2**40] * rng.choice([1, 5]))
        t.string_data.append(b"zz")


def m_nonfinite(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    fl = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT]
    if not fl:
        return
    t = _pick(rng, fl)
    a = numpy_helper.to_array(t).copy()
    if a.size:
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        t.CopyFrom(numpy_helper.from_array(a, t.name))


def m_attr(rng: random.Random, m: onnx.ModelProto, _: Path) -> None:
    """Wrong-typed, duplicated or absurd attributes (axis, transB, pads, kernel_shape)."""
    g = _some_graph(rng, m)
    if not g.node:
        return
    n = _pick(rng, g.node)
    name = rng.choice(["axis", "transB", "pads", "kernel_shape", "strides", "to", "value"])
    val: Any = rng.choice([2**62, -(2**62), 0.5, "s", [2**40, 1], [0, 0, 0], [-1]])
    try:
        n.attribute.append(helper.make_attribute(name, val))
    except (ValueError, TypeError):
        return
    if n.attribute and rng.random() < 0.3:
        n.attribute.append(n.attribute[0])


STRUCT: list[Mut] = [
    m_drop_node, m_dup_node, m_shuffle_nodes, m_dangling, m_dtype, m_dims, m_initializers,
    m_opset, m_unknown_op, m_cycle, m_empty, m_nest, m_loop_bomb, m_shape_bomb, m_external,
    m_sparse_external, m_size_lie, m_nonfinite, m_attr,
]  # fmt: skip
RARE = {m_loop_bomb: 0.02, m_nest: 0.3, m_empty: 0.3}  # costly or dull: drawn less often


def _bytes(rng: random.Random, raw: bytes, other: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.random()
    if op < 0.35 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op < 0.6:
        b = b[: rng.randrange(len(b) + 1)]
    elif op < 0.85:
        cut, cut2 = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        b = b[:cut] + other[cut2 : cut2 + rng.randint(1, 200)] + b[cut:]
    else:
        b = bytearray(rng.randbytes(rng.choice([0, 1, 16, 300, 4000])))
    return bytes(b)


def case(rng: random.Random, corpus: Sequence[Seed], tmp: Path) -> tuple[str, bytes, Any]:
    """One mutated input: (what was done, bytes, trainable argument)."""
    name, raw, trainable = _pick(rng, corpus)
    if rng.random() < 0.2:
        return f"{name}:bytes", _bytes(rng, raw, _pick(rng, corpus)[1]), trainable
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mut = _pick(rng, STRUCT)
        while rng.random() > RARE.get(mut, 1.0):
            mut = _pick(rng, STRUCT)
        try:
            mut(rng, m, tmp)
        except Exception:  # an earlier mutation broke what this one reads: skip it
            continue
        done.append(mut.__name__[2:])
    if rng.random() < 0.05:
        trainable = rng.choice([[], ["nowhere"], ["x"], "fc1.weight", [name] * 2, None])
    try:
        data = m.SerializeToString()
    except Exception:  # protobuf refuses to serialise what was built: fuzz the bytes
        return f"{name}:bytes", _bytes(rng, raw, raw), trainable
    return f"{name}:{'+'.join(done)}", data, trainable


# --------------------------------------------------------------------------- the fuzz run


def test_onnx_files_normalize_or_raise_artifact_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CASES`` mutated files; the counts per outcome are printed (``-s``)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(64, 1000.0, np.float32).tobytes())
    monkeypatch.chdir(tmp_path)  # a relative external path would find the file here
    rng = random.Random(f"{SEED}-onnx")
    corpus = seeds()
    outcomes: Counter[str] = Counter()
    slow: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    for i in range(CASES):
        what, data, trainable = case(rng, corpus, tmp_path)
        t = time.perf_counter()
        try:
            info = art.normalize(data, trainable=trainable, max_params=rng.choice([1 << 24, 40]),
                                 probe_timeout_s=PROBE_TIMEOUT_S)  # fmt: skip
        except art.ArtifactError as exc:
            assert exc.code in art.CODES and exc.detail, (i, what, exc)
            outcomes[exc.code] += 1
        except BaseException as exc:
            pytest.fail(f"case {i} ({what}): {type(exc).__name__}: {exc}")
        else:
            assert info.digest == art.digest_of(info.data), (i, what)
            assert b"secret.bin" not in info.data, (i, what)  # no external reference kept
            outcomes["ok"] += 1
        dt = time.perf_counter() - t
        slow.append((dt, what))
        assert dt < PROBE_TIMEOUT_S + 5.0, (i, what, dt)
    elapsed = time.perf_counter() - t0
    slow.sort(reverse=True)
    print(f"\n{CASES} cases in {elapsed:.1f} s ({elapsed / max(CASES, 1) * 1e3:.2f} ms/case): "
          f"{dict(outcomes.most_common())}; slowest: {slow[:3]}")  # fmt: skip
    # the fuzzer reached both sides: valid variants and many kinds of rejection
    assert outcomes["ok"] > 0 and len(outcomes) >= 6, outcomes


# --------------------------------------------------------------------------- focused cases


def _graph_model(nodes: list[onnx.NodeProto], inits: Sequence[TensorProto] = (),
                 sparse: Sequence[onnx.SparseTensorProto] = ()) -> bytes:  # fmt: skip
    """x [N, 3] -> ... -> y [N, 2]; not checked (the cases below are meant to be bad)."""
    g = helper.make_graph(nodes, "t", [_vi("x", ["N", 3])], [_vi("y", ["N", 2])],
                          initializer=list(inits), sparse_initializer=list(sparse))  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out: bytes = m.SerializeToString()
    return out


def _external(t: TensorProto, location: str, *, flag: bool = True) -> TensorProto:
    t.ClearField("raw_data")
    if flag:
        t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", location
    return t


def _external_cases() -> list[tuple[str, bytes]]:
    mm = helper.make_node("MatMul", ["x", "W"], ["z"])
    add = helper.make_node("Add", ["z", "b"], ["y"])
    vals = _external(numpy_helper.from_array(np.ones(6, np.float32), "W"), "secret.bin")
    idx = numpy_helper.from_array(np.arange(6, dtype=np.int64), "W_idx")
    sparse = helper.make_sparse_tensor(vals, idx, [3, 2])
    const = helper.make_node("Constant", [], ["W"], value=_external(_w("W", 3, 2), "secret.bin"))
    inner = helper.make_graph(
        [helper.make_node("Identity", ["Wi"], ["o"])],
        "then",
        [],
        [_vi("o", [3, 2])],
        initializer=[_external(_w("Wi", 3, 2), "s")],
    )
    iff = helper.make_node("If", ["flag"], ["W"], then_branch=inner, else_branch=inner)
    flag = numpy_helper.from_array(np.array(True), "flag")
    return [
        # onnxruntime read this one from the working directory in the probe (found by the
        # fuzzer: only graph initializers were checked)
        ("sparse initializer", _graph_model([mm, add], [_w("b", 2)], [sparse])),
        ("Constant attribute", _graph_model([const, mm, add], [_w("b", 2)])),
        ("subgraph initializer", _graph_model([iff, mm, add], [_w("b", 2), flag])),
        ("location without the flag",
         _graph_model([mm, add], [_external(_w("W", 3, 2), "secret.bin", flag=False), _w("b", 2)])),
    ]  # fmt: skip


@pytest.mark.parametrize(("where", "data"), _external_cases(), ids=lambda v: str(v)[:30])
def test_external_data_anywhere_is_refused_before_any_read(
    where: str, data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.bin").write_bytes(np.full(6, 1000.0, np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(data)
    assert err.value.code == "external_data", (where, err.value)
    assert "stored outside" in err.value.detail


def test_an_unknown_input_dtype_is_a_dtype_error() -> None:
    """An elem_type the enum does not know raised ValueError from DataType.Name."""
    m = onnx.load_from_string(gemm_mlp())
    m.graph.input[0].type.tensor_type.elem_type = 9999
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(m.SerializeToString())
    assert err.value.code in ("checker", "dtype") and "9999" in err.value.detail


@pytest.mark.parametrize("where", ["dim", "name"])
def test_a_name_or_dim_that_is_not_utf8_is_refused(where: str) -> None:
    """protobuf returns such a string field as bytes; the batch dim_param reached
    ``make_tensor_value_info`` as bytes and raised ValueError (found by the fuzzer)."""
    m = onnx.load_from_string(gemm_mlp())
    if where == "dim":
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "MARKER"
    else:
        m.graph.node[1].output[0] = m.graph.node[2].input[0] = "MARKER"
    data = m.SerializeToString().replace(b"MARKER", b"MARK\xaf\xaf")
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(data)
    assert err.value.code == "checker" and "UTF-8" in err.value.detail


def _loop_bomb(trips: int = 2**62) -> bytes:
    body = _loop_body([3, 2])
    nodes = [helper.make_node("Loop", ["M", "go", "W"], ["W2"], body=body),
             helper.make_node("MatMul", ["x", "W2"], ["y"])]  # fmt: skip
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "M"),
             numpy_helper.from_array(np.array(True), "go"), _w("W", 3, 2)]  # fmt: skip
    return _graph_model(nodes, inits)


def test_a_probe_that_never_ends_is_killed_and_the_next_one_runs() -> None:
    assert art.normalize(_loop_bomb(3)).n_classes == 2  # a short Loop is fine
    t = time.perf_counter()
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(_loop_bomb(), probe_timeout_s=1.0)
    assert err.value.code == "probe" and "longer than 1 s" in err.value.detail
    assert time.perf_counter() - t < 4.0
    assert art.normalize(gemm_mlp()).n_classes == 3  # a fresh probe process


def test_a_memory_bomb_is_a_probe_error() -> None:
    """ConstantOfShape [2**20, 2**20] (4 TiB) in the logits' path: the capped arena says no."""
    one = numpy_helper.from_array(np.ones(1, np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"], value=one),
             helper.make_node("ReduceSum", ["big"], ["r"], keepdims=0),
             helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("Add", ["z", "r"], ["y"])]  # fmt: skip
    shape = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "s")
    with pytest.raises(art.ArtifactError) as err:
        art.normalize(_graph_model(nodes, [shape, _w("W", 3, 2)]))
    assert err.value.code == "probe"


def test_a_probe_process_that_dies_is_an_error_and_is_replaced() -> None:
    from schemas.artifact_probe import ProbeError, ProbeProcess

    probe = ProbeProcess()
    try:
        info = art.normalize(gemm_mlp())  # a normalised file: the probe's own input form
        assert probe.run(info.data, info.input_shape, 10.0).logits_shape == (2, 3)
        proc = probe._proc
        assert proc is not None
        threading.Timer(0.3, proc.kill).start()  # dies mid-run (a crash in a kernel)
        bomb = _loop_bomb()
        m = onnx.load_from_string(bomb)  # in the normalised form: x -> logits, probabilities
        m.graph.output[0].name = "logits"
        m.graph.node[1].output[0] = "logits"
        m.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"]))
        m.graph.output.append(_vi("probabilities", ["N", 2]))
        with pytest.raises(ProbeError, match="died"):
            probe.run(m.SerializeToString(), (3,), 10.0)
        assert probe.run(info.data, info.input_shape, 10.0).logits_shape == (2, 3)
    finally:
        probe.close()
        probe.close()  # idempotent


# --------------------------------------------------------------------------- the REST route

ADMIN = {"Authorization": "Bearer adm"}
MAX_BYTES = 64 << 10


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    from coordinator.api import AppState, create_app
    from coordinator.artifacts import MemoryArtifacts
    from coordinator.settings import CoordinatorSettings
    from tests.test_coordinator_support import metrics

    settings = CoordinatorSettings(admin_token="adm", max_artifact_bytes=MAX_BYTES,
                                   model_store_dir=tmp_path / "m", http_port=0)  # fmt: skip
    unused: Any = None  # the artifact routes touch only settings, metrics and artifacts
    state = AppState(settings=settings, fleet=unused, jobs=unused, tasks=unused, stats=unused,
                     registry=unused, signer=unused, metrics=metrics(), publish_job=unused,
                     artifacts=MemoryArtifacts())  # fmt: skip
    app = create_app(state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


async def test_post_artifacts_answers_documented_statuses(http: httpx.AsyncClient) -> None:
    good = gemm_mlp()
    r = await http.post("/v1/artifacts", content=good)
    assert r.status_code == 401 and r.json()["detail"]
    r = await http.post("/v1/artifacts", content=good, headers=ADMIN)
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["family"] == "onnx" and r.json()["artifact"] == spec["artifact"]
    assert (await http.get(f"/v1/artifacts/{spec['artifact']}")).content
    bad: list[tuple[bytes, str, int, str]] = [
        (b"", "", 422, "artifact not_onnx"),
        (b"not an onnx file", "", 422, "artifact not_onnx"),
        (_loop_bomb(2), "?trainable=nope", 422, "artifact trainable"),
        (_external_cases()[0][1], "", 422, "artifact external_data"),
        (good, "?trainable=a,,b", 422, "trainable"),
        (b"\x00" * (MAX_BYTES + 1), "", 413, "limit"),
    ]
    for body, query, status, text in bad:
        r = await http.post(f"/v1/artifacts{query}", content=body, headers=ADMIN)
        assert r.status_code == status, (query, r.text)
        assert r.headers["content-type"] == "application/json" and text in r.json()["detail"]
    # streamed without a content-length: refused once the body passes the limit
    r = await http.post("/v1/artifacts", content=_chunks(b"\x00" * (2 * MAX_BYTES)), headers=ADMIN)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


async def test_post_artifacts_fuzzed_files_never_answer_5xx(http: httpx.AsyncClient) -> None:
    rng = random.Random(f"{SEED}-rest")
    corpus, statuses = seeds(), Counter[int]()
    for _ in range(max(CASES // 20, 30)):
        _, data, trainable = case(rng, corpus, Path("/nonexistent"))
        query = "" if not isinstance(trainable, list) or not trainable else \
            "?trainable=" + ",".join(trainable)  # fmt: skip
        r = await http.post(f"/v1/artifacts{query}", content=data, headers=ADMIN)
        statuses[r.status_code] += 1
        assert r.status_code in (201, 413, 422), r.text
        assert r.headers["content-type"] == "application/json"
        if r.status_code != 201:
            assert r.json()["detail"]
    assert statuses[422] > 0, statuses
