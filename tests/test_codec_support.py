"""Hypothesis strategies the codec tests share (no tests here)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.codec import CodecConfig

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate_f32 = st.floats(
    min_value=-1e6, max_value=1e6, width=32, allow_nan=False, allow_subnormal=False
)


def arrays(
    elements: st.SearchStrategy[float] = finite_f32, max_size: int = 300
) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=elements)


configs = st.builds(
    CodecConfig,
    topk=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.37, 1.0]),
    quant=st.sampled_from(["none", "fp16", "int8"]),
    zstd_level=st.sampled_from([-3, 1, 3]),
    error_feedback=st.booleans(),
    zstd_values=st.booleans(),
)
