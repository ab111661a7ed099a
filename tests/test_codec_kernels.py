"""The C kernels of the codec and their pure-numpy fallback accept, reject and compute alike.

``schemas.codec.kernels`` picks the C extension when it is built; these tests run every
check through both paths (the C one is required when ``FEDFLEET_REQUIRE_REAL=1``, as in CI).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import CodecConfig, decode, encode
from schemas.codec import kernels as kn
from schemas.errors import SchemaError

C_MODULE = kn._C


@pytest.fixture(params=["c", "numpy"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "c" and C_MODULE is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("the C codec kernels are not built (setup.py build_ext)")
        pytest.skip("C codec kernels not built")
    saved = kn._C
    kn._C = C_MODULE if request.param == "c" else None
    try:
        yield request.param
    finally:
        kn._C = saved


def _both(fn: Callable[[], object]) -> tuple[object, object]:
    """Run ``fn`` on the C path and on the numpy path; outcome = value or error reason."""
    out = []
    for mod in (C_MODULE, None):
        saved = kn._C
        kn._C = mod
        try:
            out.append(fn())
        except SchemaError as exc:
            out.append(("SchemaError", exc.reason))
        except IndexError:
            out.append(("IndexError",))
        finally:
            kn._C = saved
    return out[0], out[1]


needs_c = pytest.mark.skipif(C_MODULE is None, reason="C codec kernels not built")


def test_c_kernels_are_built_in_ci() -> None:
    if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
        assert kn.HAVE_C, "FEDFLEET_REQUIRE_REAL=1 but schemas.codec._kernels is missing"


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    length = draw(st.sampled_from([1, 2, 9, 64, 255, 256, 257, 1000, 70_000, 2**20 + 3]))
    k = draw(st.integers(1, min(length, 300)))
    seed = draw(st.integers(0, 2**32 - 1))
    idx = np.sort(np.random.default_rng(seed).choice(length, k, replace=False))
    return idx.astype(np.int64), length


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # `path` only selects the module state


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(index_sets(), st.integers(0, 3))
def test_elias_fano_round_trip(path: str, case: tuple[np.ndarray, int], nlow: int) -> None:
    idx, length = case
    bits, low = kn.ef_encode(idx, length, nlow)
    out = kn.ef_decode(bits.tobytes(), b"".join(low), nlow, idx.shape[0], length)
    assert out.dtype == np.int64
    assert np.array_equal(out, idx)


def test_choose_nlow_picks_the_smallest_layout() -> None:
    for k, length in [(10_000, 1_000_000), (1_000, 1_000_000), (100_000, 1_000_000), (3, 10)]:
        nlow = kn.ef_choose_nlow(k, length)
        sizes = [k * n + kn.ef_bitmap_bytes(k, length, n) for n in range(4)]
        assert sizes[nlow] == min(sizes)
    assert kn.ef_choose_nlow(10_000, 1_000_000) == 1  # top-1% of 1M: 1 low byte + bitmap


@needs_c
@settings(max_examples=400, deadline=None)
@given(index_sets(), st.integers(0, 3), st.data())
def test_c_and_numpy_agree_on_damaged_streams(
    case: tuple[np.ndarray, int], nlow: int, data: st.DataObject
) -> None:
    idx, length = case
    bits_arr, low_planes = kn.ef_encode(idx, length, nlow)
    bits = bytearray(bits_arr.tobytes())
    low = bytearray(b"".join(low_planes))
    for _ in range(data.draw(st.integers(1, 3))):
        target = low if low and data.draw(st.booleans()) else bits
        pos = data.draw(st.integers(0, len(target) - 1))
        target[pos] = data.draw(st.integers(0, 255))
    k = idx.shape[0]
    c, py = _both(lambda: kn.ef_decode(bytes(bits), bytes(low), nlow, k, length))
    if isinstance(c, np.ndarray) and isinstance(py, np.ndarray):
        assert np.array_equal(c, py)
        assert (np.diff(c) > 0).all() and c[0] >= 0 and c[-1] < length
    else:
        assert c == py


@needs_c
def test_c_and_numpy_agree_on_wrong_sizes() -> None:
    idx = np.array([3, 300, 301], np.int64)
    bits, low = kn.ef_encode(idx, 1000, 1)
    cases = [(bits.tobytes() + b"\0", low[0]), (bits.tobytes(), low[0][:2]), (b"", low[0])]
    for b, lo in cases:

        def run(b: bytes = b, lo: bytes = lo) -> object:
            return kn.ef_decode(b, lo, 1, 3, 1000)

        c, py = _both(run)
        assert c == py == ("SchemaError", "codec")


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5000),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1.0, 0.37, -2.5, 1e-3]),
    st.booleans(),
)
def test_scatter_add_is_bitwise_identical(n: int, seed: int, scale: float, int8: bool) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, n + 1))
    idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    base = rng.standard_normal(n).astype(np.float32)
    if int8:
        vals = rng.integers(-127, 128, k).astype(np.int8)
        qscale = float(np.float32(rng.random() * 1e-2))
    else:
        vals = rng.standard_normal(k).astype(np.float32)
        qscale = 1.0

    def run() -> np.ndarray:
        t = base.copy()
        kn.scatter_add(t, idx, vals, scale, qscale)
        return t

    c, py = _both(run)
    assert isinstance(c, np.ndarray) and isinstance(py, np.ndarray)
    assert np.array_equal(c.view(np.uint32), py.view(np.uint32))
    # and both equal numpy's own rule
    v = vals if not int8 else np.multiply(vals, np.float32(qscale), dtype=np.float32)
    ref = base.copy()
    ref[idx] += np.float32(scale) * v if scale != 1.0 else v
    assert np.array_equal(c.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000])
def test_int8_minimum_check_agrees(n: int) -> None:
    rng = np.random.default_rng(n)
    q = rng.integers(-127, 128, n).astype(np.int8)
    for pos in ([], [0], [n - 1], [n // 2]) if n else ([],):
        arr = q.copy()
        arr[pos] = -128
        c, numpy_path = _both(lambda: kn.has_int8_min(arr))  # noqa: B023
        assert c is numpy_path is bool(pos)


def test_random_index_bitmap_is_stored_raw_and_runs_are_compressed() -> None:
    """Index streams get zstd only when it saves >= 1/4 (frame module docstring)."""
    from schemas.codec import frame as fr

    n = 200_000
    rng = np.random.default_rng(0)
    scattered = rng.standard_normal(n).astype(np.float32)
    run = np.zeros(n, np.float32)
    run[50_000:52_000] = rng.standard_normal(2_000).astype(np.float32) + 10
    for delta, want_raw in ((scattered, True), (run, False)):
        frame = encode(delta, CodecConfig(topk=0.01, quant="int8"))
        head = fr.parse(frame, n)
        assert bool(head.sizes[0] & fr.RAW_BIT) is want_raw
        chunk = decode(frame, n)
        assert chunk.indices is not None
        np.testing.assert_array_equal(chunk.indices, np.sort(np.argsort(-np.abs(delta))[:2000]))


def test_scatter_add_out_of_range_writes_nothing(path: str) -> None:
    t = np.zeros(10, np.float32)
    for bad in ([1, 10], [-11, 2]):
        with pytest.raises(IndexError):
            kn.scatter_add(t, np.array(bad, np.int64), np.ones(2, np.float32), 1.0)
        assert not t.any()


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.integers(20, 3000), st.integers(0, 2**32 - 1), st.sampled_from([1.0, 0.6, -0.25]))
def test_int8_add_to_matches_values_path(path: str, n: int, seed: int, scale: float) -> None:
    """The fused int8 apply equals ``target[idx] += scale * values`` bit for bit."""
    rng = np.random.default_rng(seed)
    delta = rng.standard_normal(n).astype(np.float32)
    frame = encode(delta, CodecConfig(topk=0.05, quant="int8"))
    base = rng.standard_normal(n).astype(np.float32)
    fused = base.copy()
    decode(frame, n).add_to(fused, scale)
    chunk = decode(frame, n)
    assert chunk.indices is not None
    ref = base.copy()
    s = np.float32(scale)
    ref[chunk.indices] += chunk.values if scale == 1.0 else s * chunk.values
    assert np.array_equal(fused.view(np.uint32), ref.view(np.uint32))


def test_fallback_is_selected_by_environment() -> None:
    import importlib
    import sys

    saved = os.environ.get("FEDFLEET_CODEC_KERNELS")
    os.environ["FEDFLEET_CODEC_KERNELS"] = "0"
    try:
        fresh: ModuleType = importlib.import_module("schemas.codec.kernels")
        fresh = importlib.reload(fresh)
        assert fresh._C is None and not fresh.HAVE_C
    finally:
        if saved is None:
            del os.environ["FEDFLEET_CODEC_KERNELS"]
        else:
            os.environ["FEDFLEET_CODEC_KERNELS"] = saved
        importlib.reload(sys.modules["schemas.codec.kernels"])
