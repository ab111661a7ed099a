"""A PyTorch module for a family ``onnx`` job, bound to the job's flat parameter vector.

The module comes from ``spec.torch_module`` (``"pkg.mod:factory"``, imported on the
device; ``factory()`` returns an ``nn.Module`` whose named parameters or buffers carry the
ONNX initializer names of ``spec.params``) or else from the artifact with
``onnx2torch.convert``. Either way the result is a ``TorchModel``: the module plus one
``Slot`` per module tensor that holds a trainable initializer.

How onnx2torch names what it keeps: a ``Gemm`` whose weight (and bias) are initializers
becomes an ``nn.Linear`` (submodule named after the ONNX node) with ``.weight`` = B, or
B transposed when ``transB=0`` (and scaled by ``alpha``: we rewrite ``alpha``/``beta``
into ``Mul`` nodes first); ``Conv`` becomes ``nn.ConvNd`` with ``.weight``/``.bias`` as
given; ``BatchNormalization`` an ``nn.BatchNormNd``; any other initializer an op reads
(``MatMul``, ``Add``, ...) becomes a buffer ``initializers.onnx_initializer_<i>``, one per
*use* (an initializer read twice is copied twice). The names say nothing reliable about
the ONNX initializer, so the map is traced instead: the graph is converted a second time
with every trainable initializer filled with its own flat indices (1, 2, 3, ... exact
in float32 up to 2**24 per conversion; bigger models take several conversions), and each
module tensor that differs between the two conversions must hold exactly one
initializer's indices, in order (a view), transposed (``.t()``) or permuted (a gather).
A tensor derived in any other way, or a trainable initializer no tensor holds, is refused.

Before converting, ``prepare`` rewrites a copy of the graph without changing its function:
only the logits output; ``Gemm`` ``alpha``/``beta`` as ``Mul`` nodes; ``MatMul`` + ``Add``
of initializers as ``Gemm`` (an ``nn.Linear``: the built-in families' graphs train as fast
as a hand-written module); ``Reshape`` without ``allowzero`` where that means the same. A
graph above opset 17 that onnx2torch cannot convert is down-converted to 17 (what
``torch.onnx.export`` writes today needs it). Trainable batch-norm statistics get an
``EvalBatchNorm`` (``torch.batch_norm`` has no gradient for them).

Binding: each slot's tensor is deleted from the module and set, before every forward, to a
view of the one flat leaf tensor ``w`` (``TorchModel.bind``), so autograd differentiates
with respect to the ONNX initializers themselves (tied uses add up) and the optimizer
updates ``w`` in place. Every other parameter is frozen. The module always runs in
``eval()`` mode: training fits the function the ONNX graph computes (dropout off, batch
norm on its stored statistics).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_agent.errors import AgentError, TrainerUnavailable
from schemas.messages import ModelSpecMsg

if TYPE_CHECKING:
    import torch
    from torch import nn

EXACT = 1 << 24  # float32 holds every integer up to here: the trace's indices stay exact
ONNX2TORCH_OPSET = 17  # newest default-domain opset onnx2torch 1.5 converts completely


class ModelMismatch(AgentError):
    """The module built on this device does not hold or compute the job's model.

    ``reason`` is ``model_mismatch:<what>`` (e.g. ``model_mismatch:max_abs_diff=3.1e-02``,
    ``model_mismatch:param_missing=fc.weight``): the agent aborts the task with it."""

    code = "model_mismatch"

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(f"{type(self).code}:{what}"[:120], detail)


class ModelUnsupported(ModelMismatch):
    """The device cannot build a trainable module for the model at all (an op onnx2torch
    does not convert, ``torch_module`` not installed, a parameter derived in a way the trace
    cannot follow): ``reason`` is ``model_unsupported:<what>``."""

    code = "model_unsupported"


@dataclass(frozen=True, slots=True)
class Slot:
    """One module tensor fed from the flat vector: ``owner.attr = w[start:stop]`` viewed as
    ``shape`` (``how``: ``view``; ``t``: the 2-D ONNX tensor transposed; ``gather``: the
    flat slice permuted by ``index``)."""

    owner: Any  # nn.Module
    attr: str
    param: int  # index in spec.params
    start: int
    stop: int
    src_shape: tuple[int, ...]
    shape: tuple[int, ...]
    how: str = "view"
    index: Any = None  # torch.Tensor for ``gather``


class TorchModel:
    """A module whose trainable tensors are views of a flat vector (see the module doc)."""

    def __init__(self, module: nn.Module, slots: Sequence[Slot], sizes: Sequence[int]) -> None:
        self.module = module.eval()
        self.slots = tuple(slots)
        self.sizes = list(sizes)  # of each of spec.params: the flat vector's split
        self.offsets = [int(v) for v in np.cumsum([0, *self.sizes])[:-1]]

    def bind(self, w: torch.Tensor) -> None:
        """Point every slot at its view of ``w``. Views carry the autograd link to ``w``
        for one forward/backward: after ``w`` changes in place they must be made anew
        (``logits`` binds every time)."""
        # ``narrow`` views, not ``split``: a multi-view result must not see its base
        # changed in place (the optimizer steps ``w`` between binds)
        for s in self.slots:
            part = w.narrow(0, self.offsets[s.param], self.sizes[s.param])
            if s.how == "view":
                t = part.view(s.shape)
            elif s.how == "t":
                t = part.view(s.src_shape).t()
            else:
                t = part[s.index].view(s.shape)
            # a plain attribute now (``_bound`` deleted the parameter/buffer): skip
            # nn.Module.__setattr__'s registry checks, once per tensor and step
            object.__setattr__(s.owner, s.attr, t)

    def logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's logits on ``x`` with the flat parameters ``w``."""
        self.bind(w)
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- building


def offsets(spec: ModelSpecMsg) -> list[tuple[int, int, tuple[int, ...]]]:
    """(start, stop, shape) of each of ``spec.params`` in the flat vector."""
    out, at = [], 0
    for p in spec.params:
        n = int(np.prod(p.shape, dtype=np.int64))
        out.append((at, at + n, tuple(p.shape)))
        at += n
    return out


def build(spec: ModelSpecMsg, artifact: bytes) -> TorchModel:
    """The trainable module for ``spec`` (``torch_module`` when set, else onnx2torch)."""
    if spec.torch_module:
        return from_factory(spec)
    return from_onnx(spec, artifact)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


@functools.cache
def _eval_batch_norm() -> type[nn.Module]:
    """A batch norm in eval mode written out, so that its statistics can be trained too
    (``torch.batch_norm`` is not differentiable in ``running_mean``/``running_var``)."""
    import torch
    from torch import nn

    class EvalBatchNorm(nn.Module):
        def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
            super().__init__()
            self.eps = bn.eps
            self.weight, self.bias = bn.weight, bn.bias
            self.running_mean: torch.Tensor | None = bn.running_mean
            self.running_var: torch.Tensor | None = bn.running_var

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert self.running_mean is not None and self.running_var is not None
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = torch.rsqrt(self.running_var.view(shape) + self.eps)
            y = (x - self.running_mean.view(shape)) * scale
            if self.weight is not None:
                y = y * self.weight.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
            return y

    return EvalBatchNorm


def _unfuse_batch_norms(module: nn.Module, plan: dict[str, tuple[int, str, Any]]) -> None:
    """Swap each batch norm whose statistics are trained for ``_eval_batch_norm()``."""
    from torch import nn

    stats = {n.rpartition(".")[0] for n in plan if n.rpartition(".")[2].startswith("running_")}
    for name in sorted(stats):
        bn = module.get_submodule(name)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, _eval_batch_norm()(bn))


def _bound(
    module: nn.Module, plan: dict[str, tuple[int, str, Any]], spec: ModelSpecMsg
) -> TorchModel:
    """Detach the tensors named in ``plan`` (name -> (param index, how, index)) from
    ``module`` and freeze everything else."""
    where = offsets(spec)
    slots = []
    shapes = {k: tuple(v.shape) for k, v in _tensors(module).items()}
    _unfuse_batch_norms(module, plan)
    for name, (k, how, index) in plan.items():
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix)
        delattr(owner, attr)
        a, b, src = where[k]
        slots.append(Slot(owner, attr, k, a, b, src, shapes[name], how, index))
    for p in module.parameters():
        p.requires_grad_(False)
    return TorchModel(module, slots, [b - a for a, b, _ in where])


def import_factory(path: str) -> Any:
    """``pkg.mod:factory`` -> the callable (``ModelUnsupported`` ``torch_module_missing``
    when it cannot be imported); the device here, ``fedfleet job create`` for its export."""
    mod_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr or "make_model")
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelUnsupported("torch_module_missing", f"{path}: {exc}") from None
    if not callable(factory):
        raise ModelUnsupported("torch_module_missing", f"{path} is not callable")
    return factory


def from_factory(spec: ModelSpecMsg) -> TorchModel:
    """``spec.torch_module`` built and mapped by name: each of ``spec.params`` must be a
    parameter (or buffer) of that exact name and shape; aliases of it (tied weights) are
    fed too."""
    factory = import_factory(spec.torch_module)
    try:
        module = factory()
    except (ImportError, AttributeError) as exc:
        raise ModelUnsupported("torch_module_missing", f"{spec.torch_module}: {exc}") from None
    from torch import nn

    if not isinstance(module, nn.Module):
        raise ModelUnsupported("torch_module_type", f"{spec.torch_module}() is not an nn.Module")
    named = _tensors(module)
    plan: dict[str, tuple[int, str, Any]] = {}
    for k, p in enumerate(spec.params):
        t = named.get(p.name)
        if t is None:
            raise ModelMismatch(f"param_missing={p.name}", f"{spec.torch_module} has no {p.name}")
        if tuple(t.shape) != tuple(p.shape):
            raise ModelMismatch(
                f"param_shape={p.name}", f"{tuple(t.shape)} in the module, {p.shape} in the job"
            )
        for alias, u in named.items():
            if u is t:
                plan[alias] = (k, "view", None)
    return _bound(module, plan, spec)


def _onnx2torch() -> Any:
    try:
        return importlib.import_module("onnx2torch")
    except ImportError:
        raise TrainerUnavailable(
            "onnx2torch_missing", "training an ONNX model needs `pip install fedfleet[torch]`"
        ) from None


def from_onnx(spec: ModelSpecMsg, artifact: bytes) -> TorchModel:
    """The artifact converted with onnx2torch and its parameter map traced (module doc)."""
    model = prepare(onnx.load_from_string(artifact))
    inits = {t.name: t for t in model.graph.initializer}
    for p in spec.params:
        t = inits.get(p.name)
        if t is None or t.data_type != onnx.TensorProto.FLOAT:
            raise ModelMismatch(f"param_missing={p.name}", "no float32 initializer of that name")
        if tuple(t.dims) != tuple(p.shape):
            raise ModelMismatch(f"param_shape={p.name}", f"{tuple(t.dims)} in the graph")
    module, model = _convert_any(model)
    real = _tensors(module)
    plan: dict[str, tuple[int, str, Any]] = {}
    for group in _groups(spec):
        plan.update(_trace(spec, model, group, real))
    missing = set(range(len(spec.params))) - {k for k, _, _ in plan.values()}
    if missing:
        name = spec.params[min(missing)].name
        raise ModelUnsupported(f"unmapped={name}", "no module tensor holds this initializer")
    return _bound(module, plan, spec)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for conversion: only the logits output; ``Gemm`` ``alpha``/``beta``
    as ``Mul`` nodes (so no module tensor is a scaled initializer); ``Reshape`` ``allowzero``
    dropped where the shape is a constant without zeros (same meaning, and onnx2torch
    refuses the attribute); ``MatMul`` + ``Add`` of initializers as ``Gemm``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.output[1:]
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Reshape" and "allowzero" in attrs:
            shape = consts.get(n.input[1]) if len(n.input) > 1 else None
            if shape is not None and not np.any(shape == 0):
                n.attribute.remove(attrs["allowzero"])
        if n.op_type == "Gemm":
            for key, pos in (("alpha", 0), ("beta", 2)):
                a = attrs.get(key)
                if a is None or a.f == 1.0 or pos >= len(n.input) or not n.input[pos]:
                    continue
                c, out = f"_fedfleet_{key}_{i}", f"_fedfleet_{key}_{i}_out"
                g.initializer.append(numpy_helper.from_array(np.array(a.f, np.float32), name=c))
                nodes.append(helper.make_node("Mul", [n.input[pos], c], [out]))
                n.input[pos] = out
                n.attribute.remove(a)
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    fused = _fused_linear(m, nodes)
    del g.node[:]
    g.node.extend(fused)
    return m


def _rank2(model: onnx.ModelProto) -> set[str]:
    """Names of the values shape inference finds to be rank 2 (empty if it fails)."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # no shapes: no fusion
        return set()
    return {
        v.name
        for v in (*g.input, *g.value_info, *g.output)
        if v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim) == 2
    }


def _fused_linear(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``MatMul(a, W)`` read only by ``Add(., b)``, with ``a`` rank 2, ``W`` a 2-D and ``b`` a 1-D
    float initializer, as one ``Gemm(a, W, b)``: the same function, and onnx2torch makes it
    an ``nn.Linear`` (one fused op, not two modules; the built-in families are written so)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}
    uses: dict[str, int] = {}
    for n in nodes:
        for v in n.input:
            uses[v] = uses.get(v, 0) + 1
    for v in g.output:
        uses[v.name] = uses.get(v.name, 0) + 1
    matmuls = {n.output[0]: n for n in nodes if n.op_type == "MatMul" and len(n.input) == 2}
    rank2: set[str] | None = None
    fused: dict[int, onnx.NodeProto] = {}  # id of the Add -> its Gemm
    for n in nodes:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for i in (0, 1):
            mm, b = matmuls.get(n.input[i]), inits.get(n.input[1 - i])
            if mm is None or b is None or uses.get(mm.output[0]) != 1:
                continue
            w = inits.get(mm.input[1])
            if w is None or len(w.dims) != 2 or list(b.dims) != [w.dims[1]]:
                continue
            rank2 = _rank2(model) if rank2 is None else rank2
            if mm.input[0] in rank2:
                fused[id(n)] = helper.make_node(
                    "Gemm", [mm.input[0], w.name, b.name], list(n.output)
                )
                fused[id(mm)] = fused[id(n)]
                break
    out, seen = [], set()
    for n in nodes:  # the Gemm takes the Add's place (a is computed before the MatMul)
        f = fused.get(id(n))
        if f is None:
            out.append(n)
        elif n.op_type == "Add" and id(f) not in seen:
            seen.add(id(f))
            out.append(f)
    return out


def _convert(model: onnx.ModelProto) -> nn.Module:
    o2t = _onnx2torch()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    gm = o2t.convert(m)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm  # type: ignore[no-any-return]


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _convert_any(model: onnx.ModelProto) -> tuple[nn.Module, onnx.ModelProto]:
    """Convert, or down-convert the opset to what onnx2torch knows and convert again."""
    try:
        return _convert(model), model
    except NotImplementedError as exc:
        first = exc
    if _opset(model) > ONNX2TORCH_OPSET:
        try:
            older = onnx.version_converter.convert_version(model, ONNX2TORCH_OPSET)
            return _convert(older), older
        except Exception:
            pass
    raise ModelUnsupported("op", str(first)[:200])


def _groups(spec: ModelSpecMsg) -> list[list[int]]:
    """Parameter indices in runs of at most ``EXACT`` values (one traced conversion each)."""
    groups: list[list[int]] = [[]]
    size = 0
    for k, (a, b, _) in enumerate(offsets(spec)):
        if groups[-1] and size + (b - a) > EXACT:
            groups.append([])
            size = 0
        if b - a > EXACT:
            raise ModelUnsupported(f"param_too_large={spec.params[k].name}")
        groups[-1].append(k)
        size += b - a
    return groups


def _trace(
    spec: ModelSpecMsg,
    model: onnx.ModelProto,
    group: list[int],
    real: dict[str, torch.Tensor],
) -> dict[str, tuple[int, str, Any]]:
    """Convert ``model`` with the initializers of ``group`` holding 1, 2, 3, ... and read
    which module tensor holds which (module doc)."""
    import torch

    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    where = offsets(spec)
    starts: list[int] = []  # first index of each group member, in group order
    at = 0
    by_name: dict[str, np.ndarray] = {}
    for k in group:
        a, b, shape = where[k]
        starts.append(at)
        by_name[spec.params[k].name] = np.arange(at + 1, at + 1 + b - a, dtype=np.float32).reshape(
            shape
        )
        at += b - a
    for i, t in enumerate(marked.graph.initializer):
        if t.name in by_name:
            marked.graph.initializer[i].CopyFrom(numpy_helper.from_array(by_name[t.name], t.name))
    traced = _tensors(_convert(marked))
    if traced.keys() != real.keys():
        raise ModelUnsupported("convert_unstable", "conversion depends on the weights")
    plan: dict[str, tuple[int, str, Any]] = {}
    for name, t in traced.items():
        r = real[name]
        if t.shape != r.shape:
            raise ModelUnsupported("convert_unstable", f"{name} changes shape with the weights")
        if not t.is_floating_point() or torch.equal(t, r):
            continue  # a constant: not made from any trainable initializer
        v = t.detach().flatten().to(torch.float64)
        ids = v.round()
        j = int(np.searchsorted(starts, float(ids.min()) - 1, side="right")) - 1
        if not torch.equal(ids, v) or j < 0:
            raise ModelUnsupported(f"derived={name}", "not a copy of one initializer")
        k = group[j]
        local = ids.long() - 1 - starts[j]
        n = where[k][1] - where[k][0]
        if local.numel() != n or not torch.equal(torch.sort(local).values, torch.arange(n)):
            raise ModelUnsupported(f"derived={name}", "not a copy of one initializer")
        plan[name] = (k, *_how(local, where[k][2], tuple(r.shape)))
    return plan


def _how(local: torch.Tensor, src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[str, Any]:
    import torch

    n = local.numel()
    if torch.equal(local, torch.arange(n)):
        return "view", None
    if len(src) == 2 and shape == (src[1], src[0]):
        if torch.equal(local, torch.arange(n).view(src).t().flatten()):
            return "t", None
    return "gather", local.clone()
