"""On-device PyTorch training of family ``onnx`` models (``edge_agent.onnx_trainer``).

Real torch, onnx2torch and onnxruntime: an MLP built with ``onnx.helper`` (``Gemm`` nodes,
``transB`` both ways, ``alpha``/``beta``), a Conv1d net exported by ``torch.onnx.export``,
and the same net as a ``torch_module`` factory. References are small numpy / plain-torch
implementations of the published rule, never the trainer itself.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.data import load_digits_split
from edge_agent.onnx_trainer import (
    ModelMismatch,
    ModelUnsupported,
    OnnxRun,
    OnnxTorchTrainer,
    check_forward,
)
from edge_agent.torch_trainer import TorchTrainer
from edge_agent.trainers import train
from schemas.artifact import (
    ArtifactInfo,
    builtin_artifact,
    initial_flat,
    normalize,
    spec_for,
    with_weights,
)
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import init_params, standardize

pytest.importorskip("torch")
pytest.importorskip("onnx2torch")
import onnxruntime as ort
import torch
from torch import nn

# --------------------------------------------------------------------------- models


def _mlp_onnx(trainable: list[str] | None = None) -> ArtifactInfo:
    """x[N,5] -> Gemm(W1[5,10]) -> Relu -> Gemm(W2[3,10], transB=1, alpha=.5, beta=2) -> [N,3]."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.normal(scale=0.5, size=(5, 10)),
        "b1": rng.normal(scale=0.1, size=10),
        "W2": rng.normal(scale=0.5, size=(3, 10)),
        "b2": rng.normal(scale=0.1, size=3),
    }
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["out"], transB=1, alpha=0.5, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return normalize(model.SerializeToString(), trainable=trainable)


class Net(nn.Module):
    """Conv1d(1->4, k=3) -> ReLU -> Linear(32 -> 3) on inputs [N, 1, 8]."""

    def __init__(self, act: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8, 3)
        self.act = torch.tanh if act == "tanh" else torch.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.act(self.conv(x)).flatten(1))
        return out


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def make_tanh_net() -> nn.Module:  # same parameters, another function
    torch.manual_seed(0)
    return Net("tanh")


class Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8, 3)


def make_renamed() -> nn.Module:
    return Renamed()


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> ArtifactInfo:
    """``make_net()`` exported with the default (torch.export) exporter."""
    f = tmp_path_factory.mktemp("conv") / "net.onnx"
    torch.onnx.export(
        make_net().eval(),
        (torch.zeros(2, 1, 8),),
        f,
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("N")},),
        external_data=False,
    )
    return normalize(f.read_bytes())


@pytest.fixture(scope="module")
def trainer() -> OnnxTorchTrainer:
    return OnnxTorchTrainer()


def _conv_spec(info: ArtifactInfo, factory: str = "") -> ModelSpecMsg:
    return spec_for(info, torch_module=f"tests.test_onnx_trainer:{factory}" if factory else "")


def _bump_task(n: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Flat rows of 8: a bump in the first, middle or last third is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    pos = np.array([rng.integers(*((0, 3), (3, 6), (6, 8))[c]) for c in y])
    x = rng.normal(scale=0.3, size=(n, 8))
    x[np.arange(n), pos] += 2.0
    return x.astype(np.float32), y.astype(np.int64)


def _ort_logits(info: ArtifactInfo, spec: ModelSpecMsg, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(with_weights(info.data, spec.params, w))
    xs = standardize(spec, x).reshape(len(x), *spec.input_shape).astype(np.float32)
    out: np.ndarray = sess.run(["logits"], {"x": xs})[0]
    return out


def _ce(z: np.ndarray, y: np.ndarray) -> float:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def _run(
    tr: OnnxTorchTrainer,
    info: ArtifactInfo,
    spec: ModelSpecMsg,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    cfg: TrainConfig,
    seed: int = 0,
    base: npt.NDArray[np.float32] | None = None,
) -> OnnxRun:
    base = initial_flat(info.data, spec.params) if base is None else base
    run = tr.start(spec, base, x, y, cfg, seed=seed, artifact=info.data)
    while not run.step(16):
        pass
    return run


# --------------------------------------------------------------------------- parameter map


def test_gemm_parameters_map_by_trace_transposed_where_onnx2torch_transposes(
    trainer: OnnxTorchTrainer,
) -> None:
    info = _mlp_onnx()
    spec = spec_for(info)
    model = trainer.model(spec, info.data)
    assert sorted((s.start, s.stop, type(s.owner).__name__, s.how) for s in model.slots) == [
        (0, 50, "Linear", "t"),  # W1 [5,10], transB=0: nn.Linear.weight is W1.T
        (50, 60, "Linear", "view"),
        # alpha/beta != 1 are rewritten to Mul nodes: the generic Gemm reads W2 and b2
        # as buffers, as they are
        (60, 90, "Module", "view"),
        (90, 93, "Module", "view"),
    ]
    w = torch.from_numpy(np.random.default_rng(3).normal(size=93).astype(np.float32))
    model.bind(w)
    tensors = {s.start: getattr(s.owner, s.attr) for s in model.slots}
    assert torch.equal(tensors[0], w[:50].view(5, 10).T)
    assert torch.equal(tensors[60], w[60:90].view(3, 10))
    # any flat vector: the module computes what onnxruntime computes with those weights
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(16, 5)).astype(np.float32))
    check_forward(model, info.data, spec, w, x)
    assert trainer.model(spec, info.data) is model  # cached per artifact


@pytest.mark.parametrize("factory", ["", "make_net"])
def test_params_round_trip_in_spec_order(
    trainer: OnnxTorchTrainer, conv: ArtifactInfo, factory: str
) -> None:
    spec = _conv_spec(conv, factory)
    assert [p.name for p in spec.params] == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    x, y = _bump_task(32, 0)
    w = np.random.default_rng(1).normal(scale=0.3, size=conv.num_params).astype(np.float32)
    run = trainer.start(spec, w, x, y, TrainConfig(), artifact=conv.data)  # forward check at w
    assert run.params.dtype == np.float32 and np.array_equal(run.params, w)
    run.step(1)
    assert run.params.shape == w.shape and not np.array_equal(run.params, w)
    new = run.params.copy()  # a trained vector still drives the same function in both
    np.testing.assert_allclose(
        trainer.model(spec, conv.data)
        .logits(torch.from_numpy(new), torch.from_numpy(x).view(-1, 1, 8))
        .detach()
        .numpy(),
        _ort_logits(conv, spec, new, x),
        atol=1e-4,
    )


def test_only_the_named_initializers_train(trainer: OnnxTorchTrainer) -> None:
    full = _mlp_onnx()
    info = _mlp_onnx(trainable=["W2", "b2"])
    spec = spec_for(info)
    assert [p.name for p in spec.params] == ["W2", "b2"]
    x, y = _bump_task(40, 1)
    run = _run(trainer, info, spec, x[:, :5], y, TrainConfig(lr=0.5, local_epochs=3))
    assert run.params.shape == (33,)
    assert not np.allclose(run.params, initial_flat(info.data, spec.params))
    # W1/b1 stay the artifact's constants: logits equal ORT with only W2/b2 replaced
    full_w = np.concatenate([initial_flat(full.data, spec_for(full).params)[:60], run.params])
    np.testing.assert_allclose(
        _ort_logits(info, spec, run.params, x[:, :5]),
        _ort_logits(full, spec_for(full), full_w, x[:, :5]),
        atol=1e-5,
    )
    model = trainer.model(spec, info.data)
    assert not any(p.requires_grad for p in model.module.parameters())


def _bn_onnx(tail: str = "") -> ArtifactInfo:
    """Conv -> BatchNormalization -> Relu -> Flatten -> MatMul(W) + b + b on [N, 1, 8], every
    initializer trainable (the statistics too; ``b`` read twice). ``tail``: an extra op."""
    rng = np.random.default_rng(1)
    inits = {
        "cw": rng.normal(size=(4, 1, 3)),
        "cb": np.zeros(4),
        "s": np.ones(4),
        "bb": np.zeros(4),
        "mu": rng.normal(scale=0.1, size=4),
        "var": np.full(4, 1.5),
        "W": rng.normal(scale=0.2, size=(32, 3)),
        "b": rng.normal(scale=0.1, size=3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z" if tail else "out"]),
    ]
    if tail:
        nodes.append(helper.make_node(tail, ["z"], ["out"]))
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return normalize(model.SerializeToString())


def test_batch_norm_statistics_and_a_tied_initializer_train(trainer: OnnxTorchTrainer) -> None:
    info = _bn_onnx()
    spec = spec_for(info)
    model = trainer.model(spec, info.data)
    fed = sorted(s.param for s in model.slots)
    assert fed == [0, 1, 2, 3, 4, 5, 6, 7, 7]  # b feeds both Adds' buffers
    x, y = _bump_task(128, 7)
    w = np.random.default_rng(2).normal(scale=0.3, size=info.num_params).astype(np.float32)
    w[28:32] = np.abs(w[28:32]) + 0.5  # variances stay positive
    run = _run(trainer, info, spec, x, y, TrainConfig(lr=0.05, local_epochs=5), base=w)
    assert _ce(_ort_logits(info, spec, run.params, x), y) < _ce(_ort_logits(info, spec, w, x), y)
    assert not np.allclose(run.params[24:28], w[24:28])  # running_mean moved
    # the tied gradient adds up: one full-batch step moves b by lr * 2 * mean(p - onehot)
    one = _run(trainer, info, spec, x, y, TrainConfig(lr=0.05, batch_size=1000), base=w)
    z = _ort_logits(info, spec, w, x).astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    db = 2.0 * (p - np.eye(3)[y]).mean(axis=0)
    np.testing.assert_allclose(one.params[-3:], w[-3:] - 0.05 * db, rtol=0, atol=2e-6)


def test_an_op_onnx2torch_cannot_convert_is_refused(trainer: OnnxTorchTrainer) -> None:
    info = _bn_onnx(tail="Hardmax")
    with pytest.raises(ModelUnsupported) as err:
        trainer.model(spec_for(info), info.data)
    assert err.value.reason == "model_unsupported:op"


# --------------------------------------------------------------------------- forward check


def test_forward_check_refuses_a_module_that_computes_something_else(
    trainer: OnnxTorchTrainer, conv: ArtifactInfo
) -> None:
    x, y = _bump_task(20, 0)
    base = initial_flat(conv.data, conv.params)
    with pytest.raises(ModelMismatch) as err:
        trainer.start(
            _conv_spec(conv, "make_tanh_net"), base, x, y, TrainConfig(), artifact=conv.data
        )
    assert err.value.reason.startswith("model_mismatch:max_abs_diff=")
    assert not isinstance(err.value, ValueError)  # the agent must not read it as bad data


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        ("no_such_factory", "model_unsupported:torch_module_missing"),
        ("make_renamed", "model_mismatch:param_missing=fc.weight"),
    ],
)
def test_torch_module_that_does_not_fit_is_refused(
    trainer: OnnxTorchTrainer, conv: ArtifactInfo, factory: str, reason: str
) -> None:
    x, y = _bump_task(20, 0)
    with pytest.raises(ModelMismatch) as err:
        trainer.start(
            _conv_spec(conv, factory), initial_flat(conv.data, conv.params), x, y,
            TrainConfig(), artifact=conv.data,
        )  # fmt: skip
    assert err.value.reason == reason
    assert isinstance(err.value, ModelUnsupported) == reason.startswith("model_unsupported")


# --------------------------------------------------------------------------- the update rule


def _mlp_ref_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """Gradient of the ``_mlp_onnx`` graph's loss in float64, by hand."""
    w = w.astype(np.float64)
    x = x.astype(np.float64)
    W1, b1, W2, b2 = w[:50].reshape(5, 10), w[50:60], w[60:90].reshape(3, 10), w[90:]
    h = x @ W1 + b1
    r = np.maximum(h, 0)
    z = 0.5 * r @ W2.T + 2.0 * b2
    onehot = np.eye(3)[y]
    if loss == "mse":
        dz = 2.0 * (z - onehot) / z.size
    else:
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dz = (p - onehot) / len(y)
    dW2, db2 = 0.5 * dz.T @ r, 2.0 * dz.sum(axis=0)
    dh = (0.5 * dz @ W2) * (h > 0)
    return np.concatenate([(x.T @ dh).ravel(), dh.sum(axis=0), dW2.ravel(), db2])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_sgd_step_on_gemm_model_is_the_reference_gradient_step(
    trainer: OnnxTorchTrainer, loss: Literal["cross_entropy", "mse"], wd: float
) -> None:
    info = _mlp_onnx()
    spec = spec_for(info)
    x, y = _bump_task(24, 2)
    x = x[:, :5]
    w0 = initial_flat(info.data, spec.params)
    cfg = TrainConfig(lr=0.3, batch_size=1000, loss=loss, weight_decay=wd)  # one full batch
    run = _run(trainer, info, spec, x, y, cfg)
    want = w0 - 0.3 * (_mlp_ref_grad(w0, x, y, loss) + wd * w0)
    assert np.abs(want - w0).max() > 1e-2
    np.testing.assert_allclose(run.params, want, rtol=0, atol=2e-6)
    assert run.samples_seen == 24


def test_prox_term_pulls_towards_the_base_as_the_reference(trainer: OnnxTorchTrainer) -> None:
    info = _mlp_onnx()
    spec = spec_for(info)
    x, y = _bump_task(24, 3)
    x = x[:, :5]
    base = initial_flat(info.data, spec.params)
    got = {}
    for mu in (0.0, 2.0):
        cfg = TrainConfig(lr=0.3, batch_size=1000, local_epochs=4, prox_mu=mu)
        got[mu] = _run(trainer, info, spec, x, y, cfg).params
        w = base.astype(np.float64)
        for _ in range(4):
            w = w - 0.3 * (_mlp_ref_grad(w, x, y, "cross_entropy") + mu * (w - base))
        np.testing.assert_allclose(got[mu], w, rtol=0, atol=5e-6)
    assert np.linalg.norm(got[2.0] - base) < 0.9 * np.linalg.norm(got[0.0] - base)


@pytest.mark.parametrize("factory", ["", "make_net"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_optimizers_match_torch_optim_on_the_plain_module(
    trainer: OnnxTorchTrainer, conv: ArtifactInfo, factory: str, optimizer: Any
) -> None:
    spec = _conv_spec(conv, factory)
    x, y = _bump_task(48, 4)
    cfg = TrainConfig(lr=0.05, batch_size=1000, local_epochs=5, optimizer=optimizer,
                      momentum=0.8, weight_decay=0.01)  # fmt: skip
    run = _run(trainer, conv, spec, x, y, cfg)
    ref = make_net().eval()  # a plain training loop on the plain module
    params = dict(ref.named_parameters())
    ps = list(params.values())
    opt: torch.optim.Optimizer = {
        "sgd": torch.optim.SGD(ps, lr=0.05, weight_decay=0.01),
        "momentum": torch.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.01),
        "adam": torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    }[optimizer]
    xt, yt = torch.from_numpy(x).view(-1, 1, 8), torch.from_numpy(y)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(xt), yt).backward()  # type: ignore[no-untyped-call]
        opt.step()
    want = torch.cat([params[p.name].detach().flatten() for p in spec.params]).numpy()
    assert np.abs(want - initial_flat(conv.data, spec.params)).max() > 1e-2
    np.testing.assert_allclose(run.params, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_lowers_the_loss(trainer: OnnxTorchTrainer, conv: ArtifactInfo, seed: int) -> None:
    spec = _conv_spec(conv)
    x, y = _bump_task(256, 10 + seed)
    base = initial_flat(conv.data, spec.params)
    run = _run(trainer, conv, spec, x, y, TrainConfig(lr=0.1, local_epochs=10), seed=seed)
    before = _ce(_ort_logits(conv, spec, base, x), y)
    after = _ce(_ort_logits(conv, spec, run.params, x), y)
    assert after < 0.5 * before
    assert (_ort_logits(conv, spec, run.params, x).argmax(axis=1) == y).mean() > 0.8


def test_standardisation_happens_inside_the_model(
    trainer: OnnxTorchTrainer, conv: ArtifactInfo
) -> None:
    x, y = _bump_task(64, 5)
    mean = tuple(float(v) for v in x.mean(axis=0) + 1.0)
    std = tuple(float(v) for v in x.std(axis=0) * 2.0)
    spec = spec_for(conv, input_mean=mean, input_std=std)
    cfg = TrainConfig(lr=0.1, local_epochs=2, batch_size=8)
    raw = _run(trainer, conv, spec, x, y, cfg, seed=3)
    pre = _run(trainer, conv, spec_for(conv), standardize(spec, x), y, cfg, seed=3)
    np.testing.assert_allclose(raw.params, pre.params, rtol=0, atol=1e-6)


def test_non_finite_loss_raises_floating_point_error(trainer: OnnxTorchTrainer) -> None:
    info = _mlp_onnx()
    spec = spec_for(info)
    x, y = _bump_task(16, 6)
    run = trainer.start(
        spec, initial_flat(info.data, spec.params), (x[:, :5] * 1e20).astype(np.float32), y,
        TrainConfig(loss="mse"), artifact=info.data,
    )  # fmt: skip
    with pytest.raises(FloatingPointError):
        run.step(4)


# --------------------------------------------------------------------------- built-in families


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(lr=0.2, local_epochs=2, batch_size=16, prox_mu=0.3),
        TrainConfig(lr=0.05, batch_size=16, optimizer="momentum", weight_decay=0.01),
        TrainConfig(lr=0.01, batch_size=16, optimizer="adam", loss="mse"),
    ],
    ids=["sgd", "momentum", "adam-mse"],
)
def test_builtin_family_as_onnx_trains_like_the_torch_trainer(
    trainer: OnnxTorchTrainer, cfg: TrainConfig
) -> None:
    """``TorchTrainer`` on the flat layout and ``OnnxTorchTrainer`` on the family's ONNX
    export (MatMul/Add: initializers become buffers) visit the same batches: same update."""
    spec = ModelSpecMsg(family="mlp", n_features=64, n_classes=10, hidden=16)
    info = normalize(builtin_artifact(spec, seed=1))
    base = init_params(spec, seed=1)
    tr, _ = load_digits_split()
    want, want_loss = train(TorchTrainer(), spec, base, tr.x, tr.y, cfg, seed=7)
    got = _run(trainer, info, spec_for(info), tr.x, tr.y, cfg, seed=7, base=base)
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(got.params, want, rtol=0, atol=1e-5)
    assert got.mean_loss == pytest.approx(want_loss, rel=1e-5)
