"""The MNIST-1D FedAsync reference's own mixing rule (bench/mnist1d_fedasync.py), checked on
tiny hand-computed arrays and against the product's codec (no torch needed).

The bench is a script, not a package, so it is loaded from its path.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from schemas.codec import CodecConfig, decode, encode_update

BENCH = Path(__file__).resolve().parent.parent / "bench" / "mnist1d_fedasync.py"


@functools.cache
def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mnist1d_fedasync_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_mix_support_touches_only_the_sent_coordinates() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    base = np.array([0.0, 10.0, 0.0, 20.0], dtype=np.float32)
    idx = np.array([1, 3], dtype=np.int64)
    d = np.array([2.0, -4.0], dtype=np.float32)

    _bench().mix_support(x, base, idx, d, 0.5)

    # 0.5 * 2 + 0.5 * (10 + 2) = 7; 0.5 * 4 + 0.5 * (20 - 4) = 10
    np.testing.assert_array_equal(x, np.array([1.0, 7.0, 3.0, 10.0], dtype=np.float32))


def test_mix_dense_is_fedasync_on_every_coordinate() -> None:
    x = np.array([1.0, 2.0], dtype=np.float32)
    base = np.array([0.0, 4.0], dtype=np.float32)
    d = np.array([2.0, 0.0], dtype=np.float32)

    _bench().mix_dense(x, base, d, 0.25)

    # 0.75 * 1 + 0.25 * 2 = 1.25; 0.75 * 2 + 0.25 * 4 = 2.5
    np.testing.assert_array_equal(x, np.array([1.25, 2.5], dtype=np.float32))


def test_support_mix_of_decoded_frames_with_alpha_one_is_base_plus_sent() -> None:
    rng = np.random.default_rng(0)
    n, bounds = 1000, [0, 500, 1000]
    x = rng.standard_normal(n).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    delta = rng.standard_normal(n).astype(np.float32)
    frames, residual = encode_update(delta, bounds, CodecConfig(topk=0.01, quant="int8"))
    before = x.copy()
    sent = np.zeros(n, dtype=np.float32)
    mod = _bench()

    for _, start, stop, frame in frames:
        chunk = decode(frame, stop - start)
        assert chunk.indices is not None
        mod.mix_support(x[start:stop], base[start:stop], chunk.indices, chunk.values, 1.0)
        sent[start:stop][chunk.indices] = 1.0

    on = sent == 1.0
    assert on.sum() == 10  # 1% of each 500-slice = 5 per shard
    np.testing.assert_allclose(x[on], (base + delta - residual)[on], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x[~on], before[~on])


def test_add_delta_adds_the_scaled_delta_on_the_sent_coordinates_only() -> None:
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    mod = _bench()

    mod.add_delta(x, np.array([2], dtype=np.int64), np.array([4.0], dtype=np.float32), 0.5)
    np.testing.assert_array_equal(x, np.array([1.0, 2.0, 5.0], dtype=np.float32))

    mod.add_delta(x, None, np.array([2.0, 2.0, 2.0], dtype=np.float32), 0.25)
    np.testing.assert_array_equal(x, np.array([1.5, 2.5, 5.5], dtype=np.float32))


def test_topk_share_is_the_kept_part_of_the_squared_norm_per_slice() -> None:
    # two slices of 4: the top quarter (one coordinate each) keeps 3^2 and 4^2 of
    # 1 + 9 + 0 + 0 + 16 + 1 + 1 + 1 = 29
    d = np.array([1.0, -3.0, 0.0, 0.0, 1.0, 1.0, -4.0, 1.0], dtype=np.float32)

    share = _bench().topk_share(d, [0, 4, 8], 0.25)

    assert share == (9.0 + 16.0) / 29.0
    assert _bench().topk_share(np.zeros(8, dtype=np.float32), [0, 4, 8], 0.25) == 1.0
