"""The update codec's error feedback and shard cutting (encode_update / decode_update)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import (
    CodecConfig,
    decode,
    decode_update,
    encode,
    encode_update,
    encode_with_feedback,
    topk_count,
)
from schemas.errors import SchemaError
from tests.test_codec_support import configs

# ------------------------------------------------------------------------------ error feedback


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 8), configs, st.booleans())
def test_error_feedback_conserves_the_sum(
    n: int, steps: int, cfg: CodecConfig, stochastic: bool
) -> None:
    cfg = msgspec.structs.replace(cfg, error_feedback=True)
    rng = np.random.default_rng(n * 31 + steps)
    residual: np.ndarray | None = None
    sent = np.zeros(n)
    total = np.zeros(n)
    for _ in range(steps):
        delta = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
        q_rng = rng if stochastic else None
        frame, residual = encode_with_feedback(delta, residual, cfg, rng=q_rng)
        sent += decode(frame, n).to_dense()
        total += delta
    assert residual is not None
    scale = np.abs(total).max() + np.abs(sent).max() + 1e-30
    np.testing.assert_allclose(sent + residual, total, rtol=0, atol=scale * 1e-5)


def test_error_feedback_off_returns_zeros_and_ignores_residual() -> None:
    cfg = CodecConfig(topk=0.1, quant="int8", error_feedback=False)
    delta = np.arange(20, dtype=np.float32)
    frame, res = encode_with_feedback(delta, np.full(20, 100.0, np.float32), cfg)
    assert not res.any() and res.dtype == np.float32
    assert frame == encode(delta, cfg)


def test_error_feedback_residual_shape_mismatch() -> None:
    with pytest.raises(SchemaError) as err:
        encode_with_feedback(np.ones(4, np.float32), np.ones(5, np.float32), CodecConfig())
    assert err.value.reason == "shape"


def test_error_feedback_does_not_mutate_inputs() -> None:
    delta = np.arange(10, dtype=np.float32)
    residual = np.ones(10, np.float32)
    encode_with_feedback(delta, residual, CodecConfig(topk=0.2))
    encode_with_feedback(delta, None, CodecConfig(topk=0.2))
    assert delta.tolist() == list(range(10)) and residual.tolist() == [1.0] * 10


# ------------------------------------------------------------------------------ shards


def test_encode_update_cuts_by_bounds_and_reassembles() -> None:
    rng = np.random.default_rng(3)
    delta = rng.standard_normal(1000).astype(np.float32)
    bounds = [0, 300, 301, 1000]
    cfg = CodecConfig(topk=0.05, quant="int8")
    frames, residual = encode_update(delta, bounds, cfg)
    assert [(s, a, b) for s, a, b, _ in frames] == [(0, 0, 300), (1, 300, 301), (2, 301, 1000)]
    assert residual.shape == delta.shape
    rebuilt = decode_update(frames, bounds, 1000)
    np.testing.assert_allclose(rebuilt + residual, delta, atol=1e-6)
    for s, a, b, frame in frames:
        assert frame == encode(delta[a:b] + 0, cfg)  # per-shard frames are independent
        assert decode(frame, b - a).values.shape[0] == topk_count(b - a, 0.05)
        assert s == bounds.index(a)


def test_encode_update_with_residual_and_feedback_off() -> None:
    delta = np.ones(10, np.float32)
    res = np.full(10, 0.5, np.float32)
    _, r1 = encode_update(delta, [0, 5, 10], CodecConfig(topk=0.2, quant="none"), res)
    assert r1.sum() == pytest.approx(15.0 - 3.0)  # 2 of 10 sent at 1.5 each
    _, r2 = encode_update(delta, [0, 10], CodecConfig(error_feedback=False), res)
    assert not r2.any()


@pytest.mark.parametrize(
    "bounds", [[], [0], [1, 10], [0, 5], [0, 5, 5, 10], [0, 11], [0, 7, 3, 10]]
)
def test_encode_update_rejects_bad_bounds(bounds: list[int]) -> None:
    with pytest.raises(SchemaError) as err:
        encode_update(np.ones(10, np.float32), bounds, CodecConfig())
    assert err.value.reason == "shape"


def test_decode_update_rejects_chunk_not_in_manifest() -> None:
    delta = np.ones(10, np.float32)
    frames, _ = encode_update(delta, [0, 5, 10], CodecConfig())
    s, a, b, f = frames[1]
    for bad in ([(s, a + 1, b, f)], [(5, a, b, f)], [(0, a, b, f)]):
        with pytest.raises(SchemaError) as err:
            decode_update(bad, [0, 5, 10], 10)
        assert err.value.reason == "shape"
    with pytest.raises(SchemaError) as err:
        decode_update(frames, [0, 4, 10], 10)
    assert err.value.reason == "shape"
