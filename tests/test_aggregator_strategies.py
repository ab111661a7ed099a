"""Unit tests of the pure strategies with tiny hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.errors import ConfigError, UpdateRejected
from aggregator.strategies import (
    Chunk,
    ClipL2,
    FedAsync,
    FedAsyncDelta,
    FedAvg,
    FedBuff,
    FedBuffMedian,
    FedBuffTrimmedMean,
    GaussianDP,
    MaxStaleness,
    RejectNonFinite,
    StrategyOptions,
    Update,
    VersionHistory,
    build_strategy,
    hinge,
    make_staleness,
    polynomial,
)
from schemas.messages import StrategyConfig


def dense(*v: float) -> Chunk:
    return Chunk.dense(np.array(v, dtype=np.float32))


def test_staleness_functions() -> None:
    assert polynomial(0, 0.5) == 1.0
    assert polynomial(3, 0.5) == pytest.approx(0.5)
    assert hinge(4, 1.0, 4.0) == 1.0
    assert hinge(6, 1.0, 4.0) == pytest.approx(1 / 3)
    assert make_staleness("constant")(100) == 1.0
    with pytest.raises(ConfigError):
        make_staleness("nope")


def test_fedasync_exact_mixes_against_base_slice() -> None:
    s = FedAsync(np.zeros(2), alpha=0.5)
    # fresh update: x1 = 0.5*0 + 0.5*(0 + [2, 4]) = [1, 2]
    r = s.apply(Update(dense(2, 4), base_version=0))
    assert r.new_version == 1 and r.staleness == 0
    np.testing.assert_allclose(s.params, [1, 2])
    # stale (base 0): x2 = 0.5*[1,2] + 0.5*([0,0] + [2,0]) = [1.5, 1]
    s.apply(Update(dense(2, 0), base_version=0))
    np.testing.assert_allclose(s.params, [1.5, 1.0])


def test_fedasync_polynomial_uses_t_minus_tau() -> None:
    s = FedAsync(np.zeros(1), alpha=1.0, staleness_fn=lambda d: polynomial(d, 1.0))
    s.apply(Update(dense(4), base_version=0))  # t - tau = 1 -> alpha_t = 1/2
    np.testing.assert_allclose(s.params, [2.0])


def test_fedasync_sparse_mix_all_equals_zero_filled_dense() -> None:
    a = FedAsync(np.arange(5), alpha=0.3, sparse_mix="all")
    b = FedAsync(np.arange(5), alpha=0.3)
    a.apply(Update(Chunk.sparse(5, [1, 3], [1.0, -2.0]), 0))
    b.apply(Update(dense(0, 1, 0, -2, 0), 0))
    a.apply(Update(Chunk.sparse(5, [0], [5.0]), 0))
    b.apply(Update(dense(5, 0, 0, 0, 0), 0))
    np.testing.assert_allclose(a.params, b.params, atol=1e-6)


def test_fedasync_sparse_mix_support_mixes_only_sent_coordinates() -> None:
    x0 = np.arange(5, dtype=np.float32)
    s = FedAsync(x0, alpha=0.5)  # constant staleness: a_t = 0.5
    s.apply(Update(dense(1, 1, 1, 1, 1), 0))  # x1 = x0 + 0.5
    s.mark_published()
    s.apply(Update(dense(2, 2, 2, 2, 2), 1))  # base == current: x2 = x1 + 1
    s.apply(Update(Chunk.sparse(5, [1, 3], [4.0, -2.0]), 0))  # stale, sparse
    x2 = x0 + 1.5
    want = x2.copy()
    for i, d in ((1, 4.0), (3, -2.0)):
        want[i] = 0.5 * x2[i] + 0.5 * (x0[i] + d)
    np.testing.assert_allclose(s.params, want, atol=1e-6)
    with pytest.raises(ValueError, match="sparse_mix"):
        FedAsync(x0, sparse_mix="none")  # type: ignore[arg-type]


def test_fedasync_rejects_missing_history_and_future() -> None:
    s = FedAsync(np.zeros(1), alpha=0.5, history=VersionHistory(keep_every=2, capacity=1))
    s.apply(Update(dense(1), 0))
    s.apply(Update(dense(1), 1))  # base == current: accepted without history
    s.apply(Update(dense(1), 2))
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1), 1))  # version 1 never kept
    assert e.value.reason == "too_stale"
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1), 0))  # evicted (capacity 1 keeps only version 2)
    assert e.value.reason == "too_stale"
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1), 9))
    assert e.value.reason == "future_version"


def test_fedasync_delta_form() -> None:
    s = FedAsyncDelta(np.ones(2), alpha=0.5)
    s.apply(Update(dense(2, 2), 0))
    s.apply(Update(dense(2, 0), 0))  # stale, no history needed
    np.testing.assert_allclose(s.params, [3.0, 2.0])


def test_fedbuff_weights_and_flush() -> None:
    s = FedBuff(np.zeros(1), buffer_size=2, server_lr=1.0)
    assert s.apply(Update(dense(2), 0)).new_version is None
    r = s.apply(Update(dense(4), 0))
    assert r.new_version == 1
    np.testing.assert_allclose(s.params, [3.0])  # (2 + 4) / 2
    s.apply(Update(dense(3), 0))  # staleness 1: weight 1/sqrt(2)
    assert s.buffered == 1
    r2 = s.flush()
    assert r2 is not None and r2.new_version == 2
    np.testing.assert_allclose(s.params, [3.0 + 3 / np.sqrt(2)], rtol=1e-6)


def test_fedbuff_momentum() -> None:
    s = FedBuff(np.zeros(1), buffer_size=1, server_lr=0.5, server_momentum=0.5)
    s.apply(Update(dense(2), 0))  # m=2, x=1
    s.apply(Update(dense(2), 1))  # m=1+2=3, x=2.5
    np.testing.assert_allclose(s.params, [2.5])


def test_robust_reducers() -> None:
    med = FedBuffMedian(np.zeros(1), buffer_size=3)
    for v in (1.0, 100.0, 2.0):
        med.apply(Update(dense(v), 0))
    np.testing.assert_allclose(med.params, [2.0])
    tm = FedBuffTrimmedMean(np.zeros(1), buffer_size=4, trim=0.25)
    for v in (-50.0, 1.0, 3.0, 90.0):
        tm.apply(Update(dense(v), 0))
    np.testing.assert_allclose(tm.params, [2.0])


def test_fedavg_sample_weighted_rounds() -> None:
    s = FedAvg(np.zeros(1), buffer_size=2)
    s.apply(Update(dense(1), 0, num_samples=1))
    s.apply(Update(dense(4), 0, num_samples=3))
    np.testing.assert_allclose(s.params, [3.25])
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1), 0))
    assert e.value.reason == "wrong_round"


def test_wrappers() -> None:
    s = RejectNonFinite(MaxStaleness(ClipL2(FedAsyncDelta(np.zeros(2), alpha=1.0), 1.0), 1))
    s.apply(Update(dense(3, 4), 0))  # clipped to norm 1
    np.testing.assert_allclose(s.params, [0.6, 0.8], rtol=1e-6)
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(np.nan, 0), 1))
    assert e.value.reason == "non_finite"
    s.apply(Update(dense(0, 0), 1))
    s.apply(Update(dense(0, 0), 2))
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(0, 0), 0))  # staleness 3 > 1
    assert e.value.reason == "too_stale"
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1, 2, 3), 3))
    assert e.value.reason == "shape"


def test_dp_noise_is_deterministic_per_update_id() -> None:
    def run() -> np.ndarray:
        s = GaussianDP(FedAsyncDelta(np.zeros(3), alpha=1.0), clip_norm=1.0, noise_multiplier=1.0)
        s.apply(Update(Chunk.sparse(3, [1], [5.0]), 0, update_id="u1"))
        return s.params.copy()

    a, b = run(), run()
    np.testing.assert_array_equal(a, b)
    assert np.count_nonzero(a) == 3


def test_state_roundtrip_resumes_exactly() -> None:
    for name in ("fedasync", "fedbuff", "fedavg"):
        cfg = StrategyConfig(name=name, buffer_size=3, server_momentum=0.3)
        opts = StrategyOptions(robust="median") if name == "fedbuff" else None
        a = build_strategy(cfg, np.zeros(4), options=opts)
        rng = np.random.default_rng(1)
        ups = [Update(Chunk.dense(rng.normal(size=4)), 0) for _ in range(7)]
        for u in ups[:4]:
            a.apply(Update(u.chunk, a.version if name == "fedavg" else 0))
        b = build_strategy(cfg, np.zeros(4), options=opts)
        b.set_state(a.get_state())
        for u in ups[4:]:
            if name == "fedavg":
                u = Update(u.chunk, a.version)
            a.apply(u)
            b.apply(u)
        np.testing.assert_array_equal(a.params, b.params)
        assert a.version == b.version


def test_factory_dp_needs_clip() -> None:
    with pytest.raises(ConfigError):
        opts = StrategyOptions(dp_noise_multiplier=1)
        build_strategy(StrategyConfig(), np.zeros(2), options=opts)


# ------------------------------------------------ history of announced versions


def test_history_keeps_only_marked_versions_when_keep_every_is_zero() -> None:
    h = VersionHistory(keep_every=0, capacity=3)
    h.record(4, np.zeros(1, np.float32))  # automatic policy off
    assert h.versions() == []
    for v in (0, 3, 7):
        h.keep(v, np.full(1, v, np.float32))
    h.keep(9, np.ones(1, np.float32))
    assert h.versions() == [3, 7, 9]  # capacity: oldest evicted


def test_history_drops_versions_past_max_age() -> None:
    h = VersionHistory(keep_every=0, capacity=10, max_age=4)
    for v in (0, 2, 5, 6):
        h.keep(v, np.zeros(1, np.float32))
    assert h.versions() == [2, 5, 6]  # 0 < 6 - 4: no admissible update can use it


def test_fedasync_bases_are_the_announced_versions() -> None:
    s = FedAsync(np.zeros(1), alpha=0.5, history=VersionHistory(keep_every=0))
    for _ in range(3):
        s.apply(Update(dense(1), s.version))
    s.mark_published()  # version 3 announced
    s.apply(Update(dense(1), 3))
    s.apply(Update(dense(1), 3))  # base 3 kept
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(dense(1), 2))  # never announced
    assert e.value.reason == "too_stale"
    assert s.history.versions() == [0, 3]


# ------------------------------------------------ per-job robust rule and DP (StrategyConfig)


def _core(s: object) -> object:
    while isinstance(s, (RejectNonFinite, MaxStaleness, ClipL2, GaussianDP)):
        s = s.inner
    return s


def test_job_robust_rule_overrides_the_deployment_default() -> None:
    x = np.zeros(3)
    deploy = StrategyOptions(robust="median", trim_ratio=0.2)
    job_tm = StrategyConfig(name="fedbuff", robust="trimmed_mean", trim_ratio=0.3)
    core = _core(build_strategy(job_tm, x, options=deploy))
    assert isinstance(core, FedBuffTrimmedMean) and core.trim == 0.3
    core = _core(build_strategy(StrategyConfig(name="fedbuff", robust="mean"), x, options=deploy))
    assert type(core) is FedBuff  # an explicit "mean" beats the deployment's median
    core = _core(build_strategy(StrategyConfig(name="fedbuff"), x, options=deploy))
    assert isinstance(core, FedBuffMedian)  # unset: the deployment default
    # unset trim ratio falls back to the deployment's
    tm = StrategyConfig(name="fedbuff", robust="trimmed_mean")
    core = _core(build_strategy(tm, x, options=deploy))
    assert isinstance(core, FedBuffTrimmedMean) and core.trim == 0.2
    # the deployment's robust default concerns FedBuff jobs only
    assert type(_core(build_strategy(StrategyConfig(name="fedasync"), x, options=deploy))) is (
        FedAsync
    )


def _inner2(s: object) -> object:
    """The strategy two wrappers down (``RejectNonFinite(MaxStaleness(x)) -> x``)."""
    return s.inner.inner  # type: ignore[attr-defined]


def test_job_dp_overrides_the_deployment_default() -> None:
    x = np.zeros(4)
    job_dp = StrategyConfig(name="fedasync_delta", clip_norm=1.0, dp_noise_multiplier=0.7)
    s = build_strategy(job_dp, x, options=StrategyOptions(dp_seed=3))
    dp = _inner2(s)  # RejectNonFinite(MaxStaleness(GaussianDP(core)))
    assert isinstance(dp, GaussianDP) and dp.noise_multiplier == 0.7 and dp.seed == 3
    deploy = StrategyOptions(dp_noise_multiplier=2.0)
    unset = StrategyConfig(name="fedasync_delta", clip_norm=1.0)
    dp = _inner2(build_strategy(unset, x, options=deploy))
    assert isinstance(dp, GaussianDP) and dp.noise_multiplier == 2.0
    opted_out = StrategyConfig(name="fedasync_delta", clip_norm=1.0, dp_noise_multiplier=0.0)
    assert isinstance(_inner2(build_strategy(opted_out, x, options=deploy)), ClipL2)
    # same job, same seed, same update id: the same noisy model (replay-safe)
    a, b = build_strategy(job_dp, x), build_strategy(job_dp, x)
    for s in (a, b):
        s.apply(Update(dense(3, 0, 0, 4), 0, update_id="u1"))
    np.testing.assert_array_equal(a.params, b.params)
    assert np.count_nonzero(a.params) == 4  # noise on every coordinate


def test_effective_values_are_resolved_in_one_place() -> None:
    from aggregator.strategies.factory import effective

    eff = effective(StrategyConfig(name="fedbuff", trim_ratio=0.25), StrategyOptions())
    assert (eff.robust, eff.trim_ratio, eff.dp_noise_multiplier) == ("mean", 0.25, 0.0)


def test_reject_non_finite_trusts_only_decoder_checked_chunks() -> None:
    from schemas.codec import CodecConfig, DecodedChunk, decode, encode

    s = RejectNonFinite(FedAsyncDelta(np.zeros(4, np.float32), alpha=1.0))
    handmade = DecodedChunk(4, None, np.array([0, np.nan, 0, 0], np.float32))
    assert not handmade.finite
    with pytest.raises(UpdateRejected) as e:
        s.apply(Update(handmade, 0))
    assert e.value.reason == "non_finite"
    frame = encode(np.array([0.5, -1, 0, 2], np.float32), CodecConfig(topk=0.5, quant="int8"))
    chunk = decode(frame, 4)
    assert chunk.finite
    s.apply(Update(chunk, 0))
    assert np.isfinite(s.params).all() and s.params[3] != 0
