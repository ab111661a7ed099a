"""Golden tests: the aggregator's pure core equals the independent reference (atol 1e-6)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from aggregator.shard import Outcome, PartitionState
from aggregator.strategies import StrategyOptions
from aggregator.strategies.factory import Robust
from schemas.messages import CodecConfig, JobSpec, ShardUpdate, StrategyConfig
from tests.reference import rules
from tests.reference.streams import (
    init_slice,
    make_job,
    random_stream,
    ref_stream,
    shard_updates,
)

FEDASYNC_CASES = [
    StrategyConfig(name="fedasync", alpha=0.6, staleness="polynomial", staleness_a=0.5),
    StrategyConfig(
        name="fedasync",
        alpha=0.9,
        staleness="hinge",
        staleness_a=2.0,
        staleness_b=2.0,
        max_staleness=4,
    ),
    StrategyConfig(name="fedasync", alpha=0.3, staleness="constant", clip_norm=0.5),
    StrategyConfig(name="fedasync", alpha=0.6, staleness="polynomial", sparse_mix="all"),
    StrategyConfig(name="fedasync_delta", alpha=0.5, staleness="polynomial"),
]


def run_core(
    job: JobSpec,
    updates: list[ShardUpdate],
    shard: int,
    *,
    history_size: int = 16,
    robust: Robust = "mean",
    min_interval: float = 0.0,
) -> tuple[PartitionState, list[Outcome]]:
    st = PartitionState(
        "fl.updates",
        shard,
        options=StrategyOptions(history_size=history_size, robust=robust),
        min_publish_interval_s=min_interval,
    )
    outcomes = [st.handle(u, i, {job.job_id: job}.get) for i, u in enumerate(updates)]
    return st, outcomes


@pytest.mark.parametrize(
    "cfg", FEDASYNC_CASES, ids=lambda c: f"{c.name}-{c.staleness}-{c.sparse_mix}"
)
@pytest.mark.parametrize("publish_every", [1, 3])
def test_fedasync_golden(cfg: StrategyConfig, publish_every: int) -> None:
    job = make_job(cfg, publish_every=publish_every)
    stream = random_stream(job, 60, seed=publish_every, max_lag=5, dup_every=7, history_size=None)
    for shard in (0, 1):
        ups = shard_updates(job, stream, shard)
        # 4 slices in memory: older bases come from the spill tier, the result is the same
        st, outcomes = run_core(job, ups, shard, history_size=4)
        ref = rules.fedasync(
            init_slice(job, shard),
            ref_stream(ups),
            alpha=cfg.alpha,
            staleness=cfg.staleness,
            a=cfg.staleness_a,
            b=cfg.staleness_b,
            keep_every=publish_every,
            history_size=None,  # a shard: every announced slice, no bound after the ack
            max_staleness=None,
            clip_norm=cfg.clip_norm,
            delta_form=cfg.name == "fedasync_delta",
            sparse_mix=cfg.sparse_mix,
        )
        js = st.jobs[job.job_id]
        applied = [o.update_id for o in outcomes if o.status == "applied"]
        assert applied == ref.applied
        rejected = {o.update_id: o.reason for o in outcomes if o.status == "rejected"}
        assert rejected == ref.rejected == {}
        assert js.version == ref.version
        np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)
        assert len(ref.applied) > 30
        dups = [o.update_id for o in outcomes if o.status == "duplicate"]
        assert dups and set(dups) <= set(ref.applied)


@pytest.mark.parametrize("interval", [0.2, 0.5])
@pytest.mark.parametrize("publish_every", [1, 3])
def test_fedasync_time_cadence_golden(interval: float, publish_every: int) -> None:
    """Announcements need publish_every versions AND min_interval of stream time; exact
    FedAsync keeps exactly the announced versions as bases (same as the reference)."""
    cfg = StrategyConfig(name="fedasync", alpha=0.6, max_staleness=12)
    job = make_job(cfg, publish_every=publish_every)
    kw: dict[str, Any] = {"ts_step": 0.07, "min_interval": interval}
    stream = random_stream(job, 80, seed=9, max_lag=8, dup_every=7, history_size=None, **kw)
    ups = shard_updates(job, stream, 0, ts_step=0.07)
    st, outcomes = run_core(job, ups, 0, history_size=3, min_interval=interval)
    announced: list[int] = []
    ref = rules.fedasync(
        init_slice(job, 0),
        ref_stream(ups),
        alpha=cfg.alpha,
        keep_every=publish_every,
        history_size=None,
        max_staleness=None,
        min_interval=interval,
        announced=announced,
    )
    assert [pv.version for pv in st.outbox] == announced
    steps = [b - a for a, b in itertools.pairwise(announced)]
    assert min(steps) >= publish_every and len(announced) > 4
    assert [o.update_id for o in outcomes if o.status == "applied"] == ref.applied
    assert {o.update_id: o.reason for o in outcomes if o.status == "rejected"} == ref.rejected
    np.testing.assert_allclose(st.jobs[job.job_id].params, ref.x, atol=1e-6, rtol=0)
    assert len(ref.applied) > 40 and not ref.rejected
    # bases staler than the 3 slices in memory were served by the spill tier
    hist = st.jobs[job.job_id].strategy.unwrap().history  # type: ignore[attr-defined]
    assert len(hist.versions()) == 3 and min(u.base_version for u in ups) < min(hist.versions())


@pytest.mark.parametrize("robust", ["mean", "median", "trimmed_mean"])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("source", ["deployment", "job"])
def test_fedbuff_golden(robust: Robust, momentum: float, source: str) -> None:
    """The robust reducer from the deployment default or from the job's StrategyConfig."""
    per_job = source == "job"
    cfg = StrategyConfig(
        name="fedbuff",
        buffer_size=4,
        server_lr=0.8,
        server_momentum=momentum,
        max_staleness=3,
        robust=robust if per_job else None,
        trim_ratio=0.25 if per_job else None,
    )
    job = make_job(cfg)
    stream = random_stream(job, 50, seed=3, max_lag=5, dup_every=5, history_size=None)
    ups = shard_updates(job, stream, 1)
    # per job: the deployment default says something else, the job's value wins
    st, outcomes = run_core(job, ups, 1, robust="median" if per_job else robust)
    ref = rules.fedbuff(
        init_slice(job, 1),
        ref_stream(ups),
        k=4,
        server_lr=0.8,
        momentum=momentum,
        max_staleness=None,  # a shard: the bound is the coordinator's, before the ack
        reducer=robust,
        trim=0.25 if per_job else 0.1,
    )
    accepted = [o.update_id for o in outcomes if o.status in ("applied", "buffered")]
    assert accepted == ref.applied
    js = st.jobs[job.job_id]
    assert js.version == ref.version
    np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)


def test_fedavg_golden() -> None:
    cfg = StrategyConfig(name="fedavg", buffer_size=5, server_lr=1.0)
    job = make_job(cfg)
    stream = random_stream(job, 40, seed=4, fresh_only=True)
    stream.insert(12, ("late", 0, stream[0][2], 3))  # stale for the running round
    ups = shard_updates(job, stream, 0)
    st, outcomes = run_core(job, ups, 0)
    ref = rules.fedbuff(init_slice(job, 0), ref_stream(ups), k=5, fedavg=True)
    assert {o.update_id: o.reason for o in outcomes if o.status == "rejected"} == ref.rejected
    assert ref.rejected == {"late": "wrong_round"}
    js = st.jobs[job.job_id]
    assert js.version == ref.version == 8
    np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)


def test_int8_sparse_golden_uses_decoded_deltas() -> None:
    cfg = StrategyConfig(name="fedasync", alpha=0.6)
    job = make_job(cfg, n_features=200, hidden=16)
    codec_cfg = CodecConfig(topk=0.01, quant="int8")
    stream = random_stream(job, 40, seed=5, max_lag=3)
    ups = shard_updates(job, stream, 0, codec_cfg)
    st, _ = run_core(job, ups, 0)
    ref = rules.fedasync(init_slice(job, 0), ref_stream(ups), alpha=0.6)
    assert all(u.support is not None for u in ref_stream(ups))  # really sparse
    np.testing.assert_allclose(st.jobs[job.job_id].params, ref.x, atol=1e-6, rtol=0)
