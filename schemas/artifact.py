"""The model is an ONNX artifact: pure functions over the artifact's bytes.

A job's model is a *normalised* ONNX graph plus a flat float32 vector: the C-order
concatenation of the graph's trainable float32 initializers, in the order of
``ModelSpecMsg.params``. ``normalize`` turns a user's file into that form (one input
``x`` ``[N, *input_shape]`` float32, one output ``logits`` ``[N, n_classes]`` plus a
``Softmax`` output ``probabilities``) and checks it, including a probe run in
onnxruntime; ``with_weights`` / ``export_version`` put a version's vector back in. The
built-in families are generators of such artifacts (``builtin_artifact``). Every failure
is an :class:`ArtifactError` with a ``code``; no onnx/onnxruntime exception escapes.
See docs/models.md, "The model is an ONNX artifact".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from schemas.artifact_probe import PROBE, ProbeError
from schemas.artifact_probe import TIMEOUT_S as PROBE_TIMEOUT_S
from schemas.errors import FedfleetError, SchemaError
from schemas.messages import MAX_INPUT_RANK, ModelSpecMsg, ParamMsg
from schemas.modelspec import init_params, layout
from schemas.onnx_export import export
from schemas.types import F32

DEFAULT_MAX_BYTES: int = 256 << 20  # a user's ONNX file
DEFAULT_MAX_PARAMS: int = 1 << 24  # trainable float32 values (coordinator: max_params)
INPUT, LOGITS, PROBS = "x", "logits", "probabilities"
Floats = Sequence[float] | npt.NDArray[np.floating[Any]]
CODES = frozenset(
    {
        "not_onnx",  # not a parseable ONNX model (or no graph / no nodes)
        "external_data",  # a tensor (anywhere, subgraphs too) stored outside the file
        "checker",  # onnx.checker.check_model failed, or no default-domain opset
        "inputs",  # not exactly one real input, or its per-example dims are not fixed
        "outputs",  # no output, logits not [N, n_classes >= 2]
        "dtype",  # the input or logits are not float32
        "trainable",  # no float32 initializer to train, or a named one is missing/not float32
        "probe",  # onnxruntime cannot run it on zeros (or crashed, or timed out), or the
        # logits are not finite
        "too_large",  # file bytes or parameters beyond the limit
        "shape",  # a flat vector / parameter shape does not fit the artifact
        "standardize",  # input_mean / input_std do not fit the input or are not finite
        "digest",  # the bytes do not hash to the spec's artifact digest
        "family",  # asked of the wrong family (e.g. builtin_artifact of an onnx spec)
        "artifact",  # an onnx spec needs its artifact bytes for this
    }
)


class ArtifactError(SchemaError):
    """An ONNX artifact was rejected; ``code`` is one of ``CODES``, ``detail`` says why."""

    code = "artifact"

    def __init__(self, code: str, detail: str = "") -> None:
        FedfleetError.__init__(self, code, detail)


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """A normalised artifact and what a ``ModelSpecMsg`` needs to know of it."""

    digest: str  # "sha256:<hex>" of ``data``
    data: bytes = field(repr=False)  # the normalised ONNX bytes
    params: tuple[ParamMsg, ...]
    input_shape: tuple[int, ...]
    n_classes: int
    n_features: int
    num_params: int


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- graph helpers


def _parse(data: bytes) -> onnx.ModelProto:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ArtifactError("not_onnx", f"expected bytes, got {type(data).__name__}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf DecodeError, RuntimeError, ...
        raise ArtifactError("not_onnx", f"not an ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ArtifactError("not_onnx", "not an ONNX model (no graph nodes)")
    for where, t in _tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise ArtifactError("external_data", f"{where} {t.name!r} is stored outside the file")
    bad = next(_not_text(model.graph), None)
    if bad is not None:  # protobuf hands a non-UTF-8 string field over as bytes
        raise ArtifactError("checker", f"a name or dim is not UTF-8 text: {bad!r}"[:300])
    return model


def _not_text(g: onnx.GraphProto) -> Iterator[object]:
    """The names and symbolic dims in ``g`` and its subgraphs that are not ``str``."""
    for v in (*g.input, *g.output, *g.value_info):
        dims = v.type.tensor_type.shape.dim
        yield from (x for x in (v.name, *(d.dim_param for d in dims)) if not isinstance(x, str))
    for t in g.initializer:
        if not isinstance(t.name, str):
            yield t.name
    for n in g.node:
        yield from (x for x in (*n.input, *n.output, n.op_type, n.domain) if not isinstance(x, str))
        for sg in _subgraphs(n):
            yield from _not_text(sg)


def _tensors(g: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in ``g`` (initializers, sparse ones, node attributes) and its
    subgraphs, with where it sits."""
    for t in g.initializer:
        yield f"{where}initializer", t
    for s in g.sparse_initializer:
        yield f"{where}sparse initializer", s.values
        yield f"{where}sparse initializer indices", s.indices
    for n in g.node:
        for a in n.attribute:
            at = f"{where}attribute {a.name!r} of {n.op_type} node, tensor"
            yield from ((at, t) for t in (a.t, *a.tensors))
            for s in (a.sparse_tensor, *a.sparse_tensors):
                yield from ((at, t) for t in (s.values, s.indices))
        for sg in _subgraphs(n):
            yield from _tensors(sg, f"{where}subgraph {sg.name!r}: ")


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ArtifactError("checker", _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name in ``g`` and its subgraphs."""
    out = {v.name for v in (*g.input, *g.output, *g.value_info)}
    out |= {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    for n in g.node:
        out.update(n.input)
        out.update(n.output)
        for sg in _subgraphs(n):
            out |= _names(sg)
    out.discard("")
    return out


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _rename(g: onnx.GraphProto, m: Mapping[str, str], *, uses_only: bool = False) -> None:
    """Rename tensors everywhere in ``g`` (or, ``uses_only``, only where nodes read them)."""
    for n in g.node:
        for i, v in enumerate(n.input):
            if v in m:
                n.input[i] = m[v]
        for sg in _subgraphs(n):
            _rename(sg, m, uses_only=uses_only)
        if not uses_only:
            for i, v in enumerate(n.output):
                if v in m:
                    n.output[i] = m[v]
    if uses_only:
        return
    for v in (*g.input, *g.output, *g.value_info):
        v.name = m.get(v.name, v.name)
    for t in g.initializer:
        t.name = m.get(t.name, t.name)
    for s in g.sparse_initializer:
        s.values.name = m.get(s.values.name, s.values.name)


def _prune(g: onnx.GraphProto, keep_input: str) -> None:
    """Drop the nodes, initializers and annotations the graph outputs do not need."""
    needed = {o.name for o in g.output}
    for i in reversed(range(len(g.node))):
        n = g.node[i]
        if any(o in needed for o in n.output):
            needed.update(n.input)
            for sg in _subgraphs(n):
                needed |= _names(sg)  # outer-scope reads (over-approximated)
        else:
            del g.node[i]
    needed.add(keep_input)
    produced = {o for n in g.node for o in n.output}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in needed:
            del g.initializer[i]
    for i in reversed(range(len(g.sparse_initializer))):
        if g.sparse_initializer[i].values.name not in needed:
            del g.sparse_initializer[i]
    for i in reversed(range(len(g.input))):
        if g.input[i].name not in needed:
            del g.input[i]
    for i in reversed(range(len(g.value_info))):
        if g.value_info[i].name not in produced:
            del g.value_info[i]


def _real_input(g: onnx.GraphProto) -> onnx.ValueInfoProto:
    consts = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    real = [v for v in g.input if v.name not in consts]
    if len(real) != 1:
        raise ArtifactError("inputs", f"the graph has {len(real)} real inputs, need exactly 1")
    v: onnx.ValueInfoProto = real[0]
    return v


def _input_shape(v: onnx.ValueInfoProto) -> tuple[int, ...]:
    if not v.type.HasField("tensor_type"):
        raise ArtifactError("inputs", f"input {v.name!r} is not a tensor")
    tt = v.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT:
        dt = _dtype_name(tt.elem_type)
        raise ArtifactError("dtype", f"input {v.name!r} is {dt}, need FLOAT (float32)")
    dims = tt.shape.dim if tt.HasField("shape") else []
    if not 2 <= len(dims) <= 1 + MAX_INPUT_RANK:
        raise ArtifactError("inputs", f"input {v.name!r} has rank {len(dims)}, need 2..9")
    if not all(d.HasField("dim_value") and d.dim_value >= 1 for d in dims[1:]):
        raise ArtifactError("inputs", f"input {v.name!r}: per-example dims must be fixed ints")
    shape = tuple(int(d.dim_value) for d in dims[1:])
    if math.prod(shape) > 1 << 20:
        raise ArtifactError("inputs", f"input {v.name!r} has {math.prod(shape)} features")
    return shape


def _dtype_name(elem_type: int) -> str:
    try:
        return str(TensorProto.DataType.Name(elem_type))
    except ValueError:  # a number the enum does not know
        return f"data type {elem_type}"


def _check_logits_decl(v: onnx.ValueInfoProto) -> None:
    tt = v.type.tensor_type
    if not v.type.HasField("tensor_type") or tt.elem_type != TensorProto.FLOAT:
        raise ArtifactError("dtype", f"output {v.name!r} (the logits) is not float32")
    if tt.HasField("shape"):
        dims = tt.shape.dim
        if len(dims) != 2:
            raise ArtifactError("outputs", f"logits {v.name!r} have rank {len(dims)}, need 2")
        if dims[1].HasField("dim_value") and dims[1].dim_value < 2:
            raise ArtifactError("outputs", f"logits {v.name!r} have {dims[1].dim_value} classes")


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ArtifactError("checker", "no default-domain (ai.onnx) opset import")


def _trainable(
    g: onnx.GraphProto, names: Sequence[str] | None, renamed: Mapping[str, str]
) -> tuple[ParamMsg, ...]:
    if names is None:
        chosen = [t for t in g.initializer if t.data_type == TensorProto.FLOAT and all(t.dims)]
    else:
        if isinstance(names, str):
            raise ArtifactError("trainable", "trainable must be a list of names, not a string")
        wanted = [renamed.get(n, n) for n in names]
        if not wanted or len(set(wanted)) != len(wanted):
            raise ArtifactError("trainable", "the trainable names are empty or repeated")
        by_name = {t.name: t for t in g.initializer}
        for n in wanted:
            t = by_name.get(n)
            if t is None:
                raise ArtifactError(
                    "trainable", f"no initializer named {n!r} (in the logits' graph)"
                )
            if t.data_type != TensorProto.FLOAT or not all(t.dims):
                raise ArtifactError("trainable", f"initializer {n!r} is not a float32 tensor")
        chosen = [t for t in g.initializer if t.name in set(wanted)]  # graph order
    if not chosen:
        raise ArtifactError("trainable", "the graph has no float32 initializers to train")
    try:
        return tuple(ParamMsg(t.name, tuple(int(d) for d in t.dims)) for t in chosen)
    except SchemaError as exc:
        raise ArtifactError("trainable", exc.detail) from None


def _probe(data: bytes, input_shape: tuple[int, ...], timeout_s: float) -> int:
    """Run the artifact on zeros ``[2, *input_shape]`` (in the probe process,
    ``schemas.artifact_probe``: a hang, a memory bomb or a crash costs only that child);
    the number of classes."""
    try:
        r = PROBE.run(data, input_shape, timeout_s)
    except ProbeError as exc:
        text = str(exc)
        hint = " (is the batch dim fixed inside the graph?)" if "shape" in text.lower() else ""
        raise ArtifactError("probe", text[:400] + hint) from None
    shape = r.logits_shape
    if len(shape) != 2 or shape[0] != 2 or not 2 <= shape[1] <= 1 << 16:
        raise ArtifactError("outputs", f"logits of a batch of 2 have shape {shape}")
    if r.dtype != "float32" or r.probs_shape != shape:
        raise ArtifactError("dtype", f"logits are {r.dtype} {r.probs_shape}")
    if not r.finite:
        raise ArtifactError("probe", "logits on zeros are not finite")
    return int(shape[1])


# --------------------------------------------------------------------------- normalisation


def normalize(
    data: bytes,
    *,
    trainable: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_params: int = DEFAULT_MAX_PARAMS,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> ArtifactInfo:
    """Check a user's ONNX file and bring it to the normalised form (module docstring).

    ``trainable``: initializer names to train (default: every non-empty float32
    initializer); the flat order is the graph's initializer order either way.
    ``probe_timeout_s``: the longest the probe run may take (session build included).
    """
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > max_bytes:
        raise ArtifactError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    model = _parse(data)
    _check(model)
    g = model.graph
    inp = _real_input(g)
    input_shape = _input_shape(inp)
    if not g.output:
        raise ArtifactError("outputs", "the graph has no outputs")
    out = g.output[0]
    if out.name == inp.name:
        raise ArtifactError("outputs", "the first output is the input itself")
    _check_logits_decl(out)
    opset = _opset(model)
    # rename: the input to x, the first output to logits; anything else holding a
    # reserved name gets a fresh one
    renamed = {inp.name: INPUT, out.name: LOGITS}
    taken = _names(g) | {INPUT, LOGITS, PROBS}
    for r in (INPUT, LOGITS, PROBS):
        if r in taken and r not in renamed:
            renamed[r] = _fresh(r, taken)
    del g.output[1:]
    _rename(g, renamed)
    _prune(g, INPUT)
    dim0 = g.input[next(i for i, v in enumerate(g.input) if v.name == INPUT)]
    batch = dim0.type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        if batch.HasField("dim_value"):
            del g.value_info[:]  # shapes inferred with a fixed batch
        batch.Clear()
        batch.dim_param = "N"
    params = _trainable(g, trainable, renamed)
    num = sum(p.size for p in params)
    if num > max_params:
        raise ArtifactError("too_large", f"{num} trainable parameters > limit {max_params}")
    g.node.append(helper.make_node("Softmax", [LOGITS], [PROBS], axis=-1 if opset >= 11 else 1))
    g.output.append(onnx.ValueInfoProto())
    for v, name in zip(g.output, (LOGITS, PROBS), strict=True):  # [N, ?] until the probe
        v.CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch.dim_param, None]))
    n_classes = _probe(model.SerializeToString(), input_shape, probe_timeout_s)
    for v in g.output:
        v.CopyFrom(
            helper.make_tensor_value_info(v.name, TensorProto.FLOAT, [batch.dim_param, n_classes])
        )
    _check(model)
    normalised = model.SerializeToString()
    if not np.isfinite(_flat_of(g, params)).all():
        raise ArtifactError("trainable", "a trainable initializer holds NaN or Inf")
    return ArtifactInfo(
        digest=digest_of(normalised),
        data=normalised,
        params=params,
        input_shape=input_shape,
        n_classes=n_classes,
        n_features=math.prod(input_shape),
        num_params=num,
    )


# --------------------------------------------------------------------------- weights


def _trainable_tensors(
    g: onnx.GraphProto, params: Sequence[ParamMsg]
) -> Iterator[tuple[ParamMsg, onnx.TensorProto]]:
    index = {t.name: t for t in g.initializer}
    if len({p.name for p in params}) != len(params):
        raise ArtifactError("shape", "parameter names are repeated")
    for p in params:
        t = index.get(p.name)
        if t is None:
            raise ArtifactError("trainable", f"the artifact has no initializer {p.name!r}")
        if t.data_type != TensorProto.FLOAT:
            raise ArtifactError("dtype", f"initializer {p.name!r} is not float32")
        if tuple(t.dims) != p.shape:
            raise ArtifactError(
                "shape", f"initializer {p.name!r} is {tuple(t.dims)}, not {p.shape}"
            )
        yield p, t


def initial_flat(data: bytes, params: Sequence[ParamMsg]) -> F32:
    """The artifact's own values of ``params``, as one flat float32 vector."""
    return _flat_of(_parse(data).graph, params)


def _flat_of(g: onnx.GraphProto, params: Sequence[ParamMsg]) -> F32:
    parts: list[F32] = []
    for p, t in _trainable_tensors(g, params):
        try:
            parts.append(numpy_helper.to_array(t).astype(np.float32).reshape(p.size))
        except Exception as exc:  # raw_data of the wrong length, ...
            raise ArtifactError("shape", f"initializer {p.name!r}: {_first_line(exc)}") from None
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def with_weights(
    data: bytes,
    params: Sequence[ParamMsg],
    flat: F32,
    *,
    input_mean: Floats = (),
    input_std: Floats = (),
) -> bytes:
    """The artifact with ``params`` set from ``flat`` (and, given ``input_mean``/``input_std``,
    ``Sub``/``Div`` in front of everything that reads the input: it stays raw ``x``)."""
    model = _parse(data)
    g = model.graph
    vec = np.asarray(flat)
    total = sum(p.size for p in params)
    if vec.ndim != 1 or vec.shape[0] != total or not np.issubdtype(vec.dtype, np.floating):
        raise ArtifactError(
            "shape", f"need a flat float vector of {total}, got {vec.dtype}{vec.shape}"
        )
    vec = vec.astype("<f4", copy=False)
    off = 0
    for p, t in _trainable_tensors(g, params):
        t.ClearField("float_data")
        t.raw_data = vec[off : off + p.size].tobytes()
        off += p.size
    if len(input_mean) or len(input_std):
        _standardize(g, input_mean, input_std)
    out: bytes = model.SerializeToString()
    return out


def _standardize(g: onnx.GraphProto, mean: Floats, std: Floats) -> None:
    inp = _real_input(g)
    shape = _input_shape(inp)
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if m.shape != s.shape or m.shape != (math.prod(shape),):
        raise ArtifactError("standardize", f"need {math.prod(shape)} input_mean/input_std values")
    if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
        raise ArtifactError("standardize", "input_mean/input_std must be finite, std > 0")
    taken = _names(g)
    mn, sn = _fresh("input_mean", taken), _fresh("input_std", taken)
    centered, scaled = _fresh("x_centered", taken), _fresh("x_std", taken)
    _rename(g, {inp.name: scaled}, uses_only=True)
    g.initializer.extend(
        [
            numpy_helper.from_array(m.reshape(shape), mn),
            numpy_helper.from_array(s.reshape(shape), sn),
        ]
    )
    rest = onnx.GraphProto()
    rest.node.extend(g.node)
    del g.node[:]
    g.node.extend(
        [
            helper.make_node("Sub", [inp.name, mn], [centered]),
            helper.make_node("Div", [centered, sn], [scaled]),
            *rest.node,
        ]
    )


# --------------------------------------------------------------------------- families


def _params_of(spec: ModelSpecMsg) -> tuple[ParamMsg, ...]:
    if spec.family == "onnx":
        return spec.params
    return tuple(ParamMsg(t.name, t.shape) for t in layout(spec))


def builtin_artifact(spec: ModelSpecMsg, seed: int = 0) -> bytes:
    """The artifact a built-in family generates: its export, without standardisation, at
    ``init_params(spec, seed)`` (deterministic bytes)."""
    if spec.family == "onnx":
        raise ArtifactError("family", "an onnx model brings its own artifact")
    plain = msgspec.structs.replace(spec, input_mean=(), input_std=())
    return export(plain, init_params(spec, seed))


def _verified(spec: ModelSpecMsg, data: bytes | None) -> bytes:
    if data is None:
        raise ArtifactError("artifact", "an onnx model needs its artifact bytes")
    if digest_of(bytes(data)) != spec.artifact:
        raise ArtifactError("digest", f"the bytes do not hash to {spec.artifact}")
    return bytes(data)


def initial_params(spec: ModelSpecMsg, seed: int, data: bytes | None) -> F32:
    """Version 0's flat vector: built-ins from their generator (``init_params``), onnx from
    the artifact's initializers (``seed`` unused)."""
    if spec.family != "onnx":
        return init_params(spec, seed)
    return initial_flat(_verified(spec, data), spec.params)


def export_version(base: bytes, spec: ModelSpecMsg, flat: F32) -> bytes:
    """A version's ONNX: ``base`` (the normalised or built-in artifact) with the flat vector
    and the spec's standardisation; one path for every family."""
    if spec.family == "onnx":
        base = _verified(spec, base)
    return with_weights(
        base, _params_of(spec), flat, input_mean=spec.input_mean, input_std=spec.input_std
    )


def spec_for(
    info: ArtifactInfo,
    *,
    labels: Sequence[str] = (),
    input_mean: Sequence[float] = (),
    input_std: Sequence[float] = (),
    torch_module: str = "",
) -> ModelSpecMsg:
    """The ``onnx`` family spec of a normalised artifact."""
    return ModelSpecMsg(
        family="onnx",
        n_features=info.n_features,
        n_classes=info.n_classes,
        artifact=info.digest,
        params=info.params,
        input_shape=info.input_shape,
        labels=tuple(labels),
        input_mean=tuple(float(v) for v in input_mean),
        input_std=tuple(float(v) for v in input_std),
        torch_module=torch_module,
    )
