"""sim.mnist1d (data, fleet split, CSVs) and sim.cnn1d (model, ONNX export, central trainer).

Generation needs the ``mnist1d`` package and the model needs torch (both in the ``torch``
extra); those tests skip without them. The split and CSV tests are pure numpy.
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.mnist1d import (
    N_CLASSES,
    N_FEATURES,
    Mnist1dError,
    generate,
    load_mnist1d,
)

ROOT = Path(__file__).resolve().parent.parent
needs_mnist1d = pytest.mark.skipif(
    importlib.util.find_spec("mnist1d") is None, reason="needs the mnist1d package"
)
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="needs the fedfleet[torch] extra",
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def balanced_labels(per_class: int = 300) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(N_CLASSES), per_class))


# ------------------------------------------------------------------ generation


@needs_mnist1d
def test_generation_is_offline_deterministic_and_typed(offline: None) -> None:
    np.random.seed(123)
    random.seed(123)

    train, test = generate(400, 100, seed=3)
    again_train, again_test = generate(400, 100, seed=3)
    other_train, _ = generate(400, 100, seed=4)

    assert train.x.shape == (400, N_FEATURES) and test.x.shape == (100, N_FEATURES)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.flags.c_contiguous and np.all(np.isfinite(train.x))
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(test.y, again_test.y)
    assert not np.array_equal(train.x, other_train.x)
    # the generator seeds numpy's and Python's global RNGs; the caller's streams go on as if
    # it had not run
    drawn = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    assert drawn == (np.random.random(), random.random())


@needs_mnist1d
def test_labels_are_balanced_and_both_splits_hold_every_class() -> None:
    train, test = generate(900, 100, seed=0)
    everything = np.concatenate([train.y, test.y])

    assert np.bincount(everything, minlength=N_CLASSES).tolist() == [100] * N_CLASSES
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(N_CLASSES))
    assert abs(float(train.x.mean())) < 0.2  # the generator standardises the whole set


def test_bad_sample_counts_are_typed_errors() -> None:
    with pytest.raises(Mnist1dError, match="multiple of 10"):
        generate(95, 10)
    with pytest.raises(Mnist1dError):
        generate(0, 10)


@needs_mnist1d
def test_the_cache_is_written_once_then_read(tmp_path: Path, offline: None) -> None:
    first = load_mnist1d(200, 50, seed=1, cache_dir=tmp_path)
    second = load_mnist1d(200, 50, seed=1, cache_dir=tmp_path)
    other = load_mnist1d(200, 50, seed=2, cache_dir=tmp_path)

    assert not first.cached and second.cached and not other.cached
    assert first.path == second.path != other.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{first.digest}.npz", f"{other.digest}.npz"]
    )  # no temp files left
    np.testing.assert_array_equal(first.train.x, second.train.x)
    np.testing.assert_array_equal(first.test.y, second.test.y)
    assert first.args["num_samples"] == 250 and first.args["seed"] == 1
    assert "url" not in first.args


@needs_mnist1d
def test_a_broken_cache_file_is_regenerated(tmp_path: Path) -> None:
    first = load_mnist1d(100, 0, seed=5, cache_dir=tmp_path)
    assert first.path is not None
    first.path.write_bytes(b"not an npz")

    again = load_mnist1d(100, 0, seed=5, cache_dir=tmp_path)

    assert not again.cached and len(again.test) == 0
    np.testing.assert_array_equal(first.train.x, again.train.x)
    assert load_mnist1d(100, 0, seed=5, cache_dir=tmp_path).cached


# ------------------------------------------------------------------ the model


def test_importing_the_modules_needs_no_torch() -> None:
    code = "import sys, sim, sim.mnist1d, sim.cnn1d; assert 'torch' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


@needs_torch
def test_the_cnn_is_big_enough_shaped_and_seeded() -> None:
    import torch

    from sim.cnn1d import make_cnn, num_params

    model = make_cnn()
    state = torch.get_rng_state()
    same, other = make_cnn(0), make_cnn(1)

    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert num_params(model) >= 100_000
    x = torch.randn(5, N_FEATURES)
    assert model(x).shape == (5, N_CLASSES)
    assert torch.equal(model(x), model(x.unsqueeze(1)))  # [N, 40] and [N, 1, 40]
    for (name, a), (_, b), (_, c) in zip(model.named_parameters(), same.named_parameters(),
                                         other.named_parameters(), strict=True):  # fmt: skip
        assert torch.equal(a, b) and not torch.equal(a, c), name


@needs_torch
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_equals_torch_and_keeps_the_parameter_names(dynamo: bool) -> None:
    import onnx

    from sim.cnn1d import ATOL, export_onnx, make_cnn, max_abs_diff

    model = make_cnn(3)
    data = export_onnx(model, dynamo=dynamo)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)

    floats = [(i.name, tuple(i.dims)) for i in proto.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT]  # fmt: skip
    assert floats == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    rng = np.random.default_rng(0)
    for n in (1, 7):  # the batch dimension is dynamic
        x = (rng.standard_normal((n, N_FEATURES)) * 2).astype(np.float32)
        assert max_abs_diff(model, data, x) <= ATOL


@needs_torch
def test_onnx2torch_turns_the_export_back_into_the_same_function() -> None:
    onnx2torch = pytest.importorskip("onnx2torch")
    import onnx
    import torch

    from sim.cnn1d import export_onnx, make_cnn

    model = make_cnn(0)
    back = onnx2torch.convert(onnx.load_from_string(export_onnx(model)))
    x = torch.randn(6, N_FEATURES)

    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())


@needs_torch
@needs_mnist1d
def test_a_short_central_run_beats_chance_clearly() -> None:
    from sim.cnn1d import central_train

    train, test = generate(4000, 1000, seed=0)
    seen: list[int] = []

    hist = central_train(train, test, 4, 0, batch_size=32, lr=3e-3,
                         on_epoch=lambda h: seen.append(len(h.accuracy)))  # fmt: skip

    assert seen == [1, 2, 3, 4] and len(hist.accuracy) == len(hist.loss) == len(hist.seconds)
    assert hist.accuracy[-1] > 0.6  # chance is 0.1 (this run: 0.86)
    assert hist.loss[-1] < hist.loss[0]
    assert hist.samples_per_s > 0 and hist.model is not None
