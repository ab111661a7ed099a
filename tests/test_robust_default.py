"""Robust aggregation on by default: the adaptive clipping bound (and FedAvg's sample cap),
held to the independent reference (``tests/reference/rules.py``), its checkpoint/replay
determinism, the coordinator's job default, and a small Byzantine learning check."""

from __future__ import annotations

import functools
from typing import Any, Literal

import httpx
import msgspec
import numpy as np
import pytest

from aggregator import checkpoint as ck
from aggregator.shard import PartitionState
from aggregator.strategies import (
    ClipL2,
    FedAsyncDelta,
    FedAvg,
    GaussianDP,
    StrategyOptions,
    Wrapper,
    build_strategy,
)
from aggregator.strategies.adaptive import (
    NORMS_KEY,
    PEAKS_KEY,
    AdaptiveClip,
    CapSamples,
    MedianWindow,
)
from aggregator.strategies.base import Chunk, Strategy, Update
from coordinator.api import AppState
from coordinator.jobs import DEFAULT_CLIP_MULTIPLIER, build_job
from edge_agent.data import load_digits_split, partition_dirichlet
from edge_agent.trainers import NumpyTrainer, accuracy, train
from schemas.errors import SchemaError
from schemas.messages import JobSpec, ModelSpecMsg, ShardUpdate, StrategyConfig, TrainConfig
from schemas.modelspec import init_params
from sim.byzantine import Attack, AttackKind, ByzantineTrainer, forge, output_bias_index
from tests.reference import rules
from tests.reference.streams import init_slice, make_job, random_stream, ref_stream, shard_updates
from tests.test_coordinator_api import AUTH, JOB, api
from tests.test_coordinator_support import redis_url

__all__ = ["api", "redis_url"]  # fixtures
Api = tuple[httpx.AsyncClient, AppState, list[Any]]
Stream = list[tuple[str, int, np.ndarray, int]]


def chain(s: Strategy) -> list[type]:
    out: list[type] = []
    while isinstance(s, Wrapper):
        out.append(type(s))
        s = s.inner
    return [*out, type(s)]


# --------------------------------------------------------------------------- the rule


def test_median_window_is_the_lower_median_with_the_current_value() -> None:
    w = MedianWindow(4)  # keeps 3, the median is over those 3 and the current value
    assert w.median_with(7.0) == 7.0  # nothing seen: the value itself
    for v in (1.0, 5.0):
        w.push(v)
    assert w.median_with(100.0) == 5.0  # [1, 5, 100]
    assert w.median_with(0.5) == 1.0  # [0.5, 1, 5]
    w.push(3.0)
    assert w.median_with(100.0) == 3.0  # [1, 3, 5, 100]: lower median
    w.push(9.0)  # the oldest (1) leaves
    assert w.to_array().tolist() == [5.0, 3.0, 9.0]
    assert w.median_with(0.0) == 3.0  # [0, 3, 5, 9]


def test_adaptive_clip_bounds_an_outlier_from_the_second_update_on() -> None:
    s = AdaptiveClip(FedAsyncDelta(np.zeros(2), alpha=1.0), multiplier=2.0, window=10)
    s.apply(Update(Chunk.dense([3.0, 4.0]), 0))  # the first is taken as it is: norm 5, peak 4
    # peak bound P = 2 x median(4, 400) = 8; L2 bound B = 2 x median(5, 500) = 10, and the
    # norm 500 is past it: [8, 8] scaled to norm T = B * B / 500 = 0.2
    s.apply(Update(Chunk.dense([300.0, 400.0]), 1))
    r = 0.2 / np.sqrt(2)
    np.testing.assert_allclose(s.params, [3.0 + r, 4.0 + r], rtol=1e-6)
    s.apply(Update(Chunk.dense([0.0, 1.0]), 2))  # medians 5 and 4 (of 3 values): untouched
    np.testing.assert_allclose(s.params, [3.0 + r, 5.0 + r], rtol=1e-6)
    st = s.get_state()
    assert st.arrays[NORMS_KEY].tolist() == [5.0, 500.0, 1.0]
    assert st.arrays[PEAKS_KEY].tolist() == [4.0, 400.0, 1.0]
    assert s.clipped == 1


@pytest.mark.parametrize(("n", "moved"), [(3.9, 3.9), (4.0, 4.0), (8.0, 2.0), (400.0, 0.04)])
def test_up_to_the_bound_an_update_counts_in_full_past_it_the_less_the_further(
    n: float, moved: float
) -> None:
    s = AdaptiveClip(FedAsyncDelta(np.zeros(4), alpha=1.0), multiplier=2.0, window=10)
    for v in range(3):
        s.apply(Update(Chunk.dense([2.0, 0.0, 0.0, 0.0]), v))  # norm 2, peak 2: B = P = 4
    before = s.params.copy()
    s.apply(Update(Chunk.dense(np.full(4, n / 2)), 3))  # norm n: moves min(n, B * B / n)
    assert float(np.linalg.norm(s.params - before)) == pytest.approx(moved, rel=1e-5)


def test_the_peak_bound_stops_an_upload_that_spends_it_all_on_one_coordinate() -> None:
    s = AdaptiveClip(FedAsyncDelta(np.zeros(4), alpha=1.0), multiplier=2.0, window=10)
    for v in range(3):
        s.apply(Update(Chunk.dense([1.0, -1.0, 1.0, -1.0]), v))  # norm 2, peak 1
    before = s.params.copy()
    s.apply(Update(Chunk.sparse(4, [3], [3.5]), 3))  # within B = 4: L2 alone lets it through
    np.testing.assert_allclose(s.params - before, [0.0, 0.0, 0.0, 2.0])  # P = 2


def test_cap_samples_bounds_a_forged_claim() -> None:
    s = CapSamples(FedAvg(np.zeros(1), buffer_size=3), multiplier=3.0, window=10)
    for n, v in ((10, 1.0), (12, 1.0), (10**9, -1.0)):  # forged: a billion samples
        s.apply(Update(Chunk.dense([v]), 0, n))
    # weights 10, 12 and min(1e9, 3 * 12): (10 + 12 - 36) / 58
    np.testing.assert_allclose(s.params, [(10 + 12 - 36) / 58], rtol=1e-6)


def test_strategy_config_keeps_the_bound_off_and_validates_it() -> None:
    assert StrategyConfig().clip_multiplier == 0.0  # golden streams build JobSpecs directly
    dp = {"clip_multiplier": 3.0, "clip_norm": 1.0, "dp_noise_multiplier": 1.0}
    for bad in ({"clip_multiplier": 0.5}, {"clip_multiplier": -1.0}, {"clip_window": 1}, dp):
        with pytest.raises((SchemaError, msgspec.ValidationError)):
            msgspec.convert(bad, StrategyConfig, strict=True)


def test_factory_wraps_adaptive_outside_fixed_and_caps_samples_for_fedavg() -> None:
    x = np.zeros(4)
    both = StrategyConfig(name="fedasync", clip_multiplier=3.0, clip_norm=1.0)
    assert chain(build_strategy(both, x))[2:4] == [AdaptiveClip, ClipL2]
    avg = StrategyConfig(name="fedavg", clip_multiplier=3.0)
    assert CapSamples in chain(build_strategy(avg, x))
    assert CapSamples not in chain(build_strategy(StrategyConfig(clip_multiplier=3.0), x))
    # a deployment-wide DP default: its fixed clip_norm is the bound, not the adaptive one
    dp = StrategyOptions(dp_noise_multiplier=0.5)
    cfg = StrategyConfig(name="fedasync_delta", clip_norm=1.0, clip_multiplier=3.0)
    got = chain(build_strategy(cfg, x, options=dp))
    assert GaussianDP in got and AdaptiveClip not in got


# --------------------------------------------------------------------------- vs reference


def with_outliers(stream: Stream, *, every: int = 5, scale: float = 40.0) -> Stream:
    """Every ``every``-th update ``scale`` x larger, and a claim of a million samples."""
    return [(u, b, d * np.float32(scale), 10**6) if i % every == 2 else (u, b, d, n)
            for i, (u, b, d, n) in enumerate(stream)]  # fmt: skip


def run_core(job: JobSpec, ups: list[ShardUpdate], shard: int) -> PartitionState:
    st = PartitionState("fl.updates", shard, options=StrategyOptions(history_size=4))
    for i, u in enumerate(ups):
        st.handle(u, i, {job.job_id: job}.get)
    return st


def clipped(s: Strategy) -> int:
    while isinstance(s, Wrapper):
        if isinstance(s, AdaptiveClip):
            return s.clipped
        s = s.inner
    return -1


@pytest.mark.parametrize("name", ["fedasync", "fedasync_delta"])
@pytest.mark.parametrize(("multiplier", "window"), [(1.5, 8), (3.0, 100)])
def test_fedasync_adaptive_clip_matches_the_reference(
    name: Literal["fedasync", "fedasync_delta"], multiplier: float, window: int
) -> None:
    cfg = StrategyConfig(name=name, alpha=0.6, clip_multiplier=multiplier, clip_window=window)
    job = make_job(cfg, publish_every=2)
    stream = with_outliers(random_stream(job, 60, seed=11, max_lag=4, history_size=None))
    for shard in (0, 1):
        ups = shard_updates(job, stream, shard)
        js = run_core(job, ups, shard).jobs[job.job_id]
        ref = rules.fedasync(
            init_slice(job, shard), ref_stream(ups), alpha=0.6, keep_every=2,
            history_size=None, max_staleness=None, delta_form=name == "fedasync_delta",
            clip_multiplier=multiplier, clip_window=window,
        )  # fmt: skip
        assert js.version == ref.version == 60
        np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)
        assert clipped(js.strategy) >= 12  # the outliers, at least
        off = rules.fedasync(init_slice(job, shard), ref_stream(ups), alpha=0.6, keep_every=2,
                             history_size=None, max_staleness=None,
                             delta_form=name == "fedasync_delta")  # fmt: skip
        assert np.abs(off.x - ref.x).max() > 0.1  # the bound really changed the model


@pytest.mark.parametrize("name", ["fedbuff", "fedavg"])
def test_buffered_adaptive_clip_and_sample_cap_match_the_reference(
    name: Literal["fedbuff", "fedavg"],
) -> None:
    cfg = StrategyConfig(name=name, buffer_size=4, server_lr=0.8, clip_multiplier=2.0,
                         clip_window=16)  # fmt: skip
    job = make_job(cfg)
    fresh = name == "fedavg"
    stream = with_outliers(random_stream(job, 48, seed=5, fresh_only=fresh, history_size=None))
    ups = shard_updates(job, stream, 1)
    js = run_core(job, ups, 1).jobs[job.job_id]
    ref = rules.fedbuff(init_slice(job, 1), ref_stream(ups), k=4, server_lr=0.8,
                        max_staleness=None, fedavg=fresh, clip_multiplier=2.0,
                        clip_window=16)  # fmt: skip
    assert js.version == ref.version == 12
    np.testing.assert_allclose(js.params, ref.x, atol=1e-6, rtol=0)


def test_checkpoint_and_replay_mid_stream_give_the_same_model() -> None:
    """A shard checkpoints at record 25, goes on to 40 and dies; its successor restores the
    checkpoint and replays 25.. from the log: the same model, bit for bit, as a shard that
    never stopped, and as the reference. Without the saved window it would differ."""
    cfg = StrategyConfig(name="fedasync", alpha=0.6, clip_multiplier=1.5, clip_window=10)
    job = make_job(cfg, publish_every=3)
    stream = with_outliers(random_stream(job, 70, seed=2, max_lag=5, history_size=None), every=4)
    ups = shard_updates(job, stream, 0)
    lookup = {job.job_id: job}.get
    store = ck.MemoryCheckpointStore()
    a = PartitionState("fl.updates", 0)
    for i, u in enumerate(ups[:25]):
        a.handle(u, i, lookup)
    ckpt, blobs, _ = a.checkpoint()
    for k, v in blobs.items():
        store.save(k, v)
    store.save(a.key, ck.dumps(ckpt))
    saved = ckpt.jobs[0].arrays[NORMS_KEY]
    assert len(np.frombuffer(saved, "<f4")) == 9  # window - 1 norms
    for i, u in enumerate(ups[25:40], start=25):  # never checkpointed: then kill -9
        a.handle(u, i, lookup)
    blob = store.load(a.key)
    assert blob is not None

    def successor(ckpt_bytes: bytes) -> PartitionState:
        b = PartitionState("fl.updates", 0)
        b.restore(ck.loads(ckpt_bytes), store.load)
        for i, u in enumerate(ups[b.next_offset :], start=b.next_offset):
            b.handle(u, i, lookup)
        return b

    b = successor(blob)
    for i, u in enumerate(ups[40:], start=40):
        a.handle(u, i, lookup)
    ja, jb = a.jobs[job.job_id], b.jobs[job.job_id]
    np.testing.assert_array_equal(ja.params, jb.params)
    assert ja.version == jb.version == 70
    assert clipped(ja.strategy) == clipped(jb.strategy) > 10
    np.testing.assert_array_equal(
        ja.strategy.get_state().arrays[NORMS_KEY], jb.strategy.get_state().arrays[NORMS_KEY]
    )
    ref = rules.fedasync(init_slice(job, 0), ref_stream(ups), alpha=0.6, keep_every=3,
                         history_size=None, max_staleness=None, clip_multiplier=1.5,
                         clip_window=10)  # fmt: skip
    np.testing.assert_allclose(jb.params, ref.x, atol=1e-6, rtol=0)
    # the window is state: a checkpoint without it resumes to a different model
    raw = msgspec.msgpack.decode(blob)
    del raw["jobs"][0]["arrays"][NORMS_KEY]
    c = successor(msgspec.msgpack.encode(raw))
    assert np.abs(c.jobs[job.job_id].params - ja.params).max() > 1e-4


# --------------------------------------------------------------------------- coordinator


def test_build_job_turns_the_bound_on_unless_the_job_sets_clipping() -> None:
    body = {k: v for k, v in JOB.items() if k != "strategy"}
    assert build_job(body).spec.strategy.clip_multiplier == DEFAULT_CLIP_MULTIPLIER > 0
    default = build_job({**body, "strategy": {"name": "fedbuff"}}).spec.strategy
    assert (default.name, default.clip_multiplier) == ("fedbuff", DEFAULT_CLIP_MULTIPLIER)
    off = build_job({**body, "strategy": {"clip_multiplier": 0}}).spec.strategy
    assert (off.clip_multiplier, off.clip_norm) == (0.0, 0.0)
    fixed = build_job({**body, "strategy": {"clip_norm": 2.5}}).spec.strategy
    assert (fixed.clip_multiplier, fixed.clip_norm) == (0.0, 2.5)
    both = build_job({**body, "strategy": {"clip_norm": 2.5, "clip_multiplier": 2}}).spec
    assert (both.strategy.clip_multiplier, both.strategy.clip_norm) == (2.0, 2.5)


async def test_post_job_gets_the_adaptive_bound_and_an_explicit_off_is_kept(api: Api) -> None:
    c, _, published = api
    r = await c.post("/v1/jobs", json={**JOB, "job_id": "robust"}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["strategy"]["clip_multiplier"] == DEFAULT_CLIP_MULTIPLIER
    assert published[-1].strategy.clip_multiplier == DEFAULT_CLIP_MULTIPLIER  # on fl.jobs
    plain = {**JOB["strategy"], "clip_multiplier": 0}  # type: ignore[dict-item]
    body = {**JOB, "job_id": "plain", "model_name": "plain", "strategy": plain}
    r = await c.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["strategy"]["clip_multiplier"] == 0.0
    assert published[-1].job_id == "plain" and published[-1].strategy.clip_multiplier == 0.0
    got = (await c.get("/v1/jobs/robust", headers=AUTH)).json()
    assert got["strategy"]["clip_multiplier"] == DEFAULT_CLIP_MULTIPLIER  # stored as created
    bad = {**JOB, "job_id": "bad", "model_name": "bad", "strategy": {"clip_multiplier": 0.5}}
    assert (await c.post("/v1/jobs", json=bad, headers=AUTH)).status_code == 422


# --------------------------------------------------------------------------- learning


def test_attacks_forge_the_delta() -> None:
    spec = ModelSpecMsg(family="softmax", n_features=2, n_classes=3)
    d = np.arange(9, dtype=np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(forge(spec, d, Attack(kind="sign_flip"), rng), -4 * d)
    np.testing.assert_array_equal(forge(spec, d, Attack(kind="scaled"), rng), 100 * d)
    assert np.linalg.norm(forge(spec, d, Attack(kind="random"), rng)) == pytest.approx(100)
    bias = forge(spec, d, Attack(kind="bias"), rng)
    assert output_bias_index(spec) == 6 and bias[6] == 6 + 1e4
    np.testing.assert_array_equal(np.delete(bias, 6), np.delete(d, 6))


def fleet_accuracy(
    multiplier: float, attack: AttackKind | Literal["silent"] | None, *, updates: int = 300
) -> float:
    """A small single-process async fleet (30 devices, 8 in flight, exact FedAsync, one
    shard); with an ``attack``, 6 of the devices (20%) forge every upload with it
    (``silent``: they upload zero deltas, the best a defence can make of them)."""
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    train_ds, test = load_digits_split(seed=0)
    parts = partition_dirichlet(train_ds.y, 30, 0.5, seed=0)
    cfg = StrategyConfig(alpha=0.6, clip_multiplier=multiplier, max_staleness=1000)
    s = build_strategy(cfg, init_params(spec, 0), options=StrategyOptions(history_size=1000))
    honest = NumpyTrainer()
    kind: AttackKind = "bias" if attack is None or attack == "silent" else attack
    evil = ByzantineTrainer(honest, Attack(kind=kind))
    tcfg = TrainConfig(lr=0.5, local_epochs=2, batch_size=8)
    rng = np.random.default_rng(1)
    snapshots = {0: s.params.copy()}
    in_flight = [(int(rng.integers(30)), 0) for _ in range(8)]
    for n in range(updates):
        dev, base_v = in_flight.pop(int(rng.integers(len(in_flight))))
        d = train_ds.subset(parts[dev])
        trainer = evil if attack and dev < 6 else honest
        new, _ = train(trainer, spec, snapshots[base_v], d.x, d.y, tcfg, seed=n)
        delta = (new - snapshots[base_v]).astype(np.float32)
        if attack == "silent" and dev < 6:
            delta[:] = 0.0
        s.apply(Update(Chunk.dense(delta), base_v, len(d), f"u{n}"))
        snapshots[s.version] = s.params.copy()
        in_flight.append((int(rng.integers(30)), s.version))
    return accuracy(spec, s.params, test.x, test.y)


@functools.cache
def reference_accuracy(kind: Literal["clean", "silent"]) -> float:
    return fleet_accuracy(0.0, None if kind == "clean" else "silent")


def test_the_bound_costs_a_clean_fleet_nothing() -> None:
    assert reference_accuracy("clean") > 0.9
    assert fleet_accuracy(DEFAULT_CLIP_MULTIPLIER, None) > reference_accuracy("clean") - 0.01


@pytest.mark.parametrize(("attack", "gap"), [("bias", 0.01), ("sign_flip", 0.08)])
def test_the_bound_keeps_a_byzantine_fleet_near_a_clean_one(attack: AttackKind, gap: float) -> None:
    """No defence: the forged uploads win. With it the fleet does about as well as if the
    Byzantine devices had uploaded nothing (their data is lost either way: ~3 points in
    this small fleet): the +1e4 bias exactly so; -4 x flips still slow this short run
    down (over a whole job, 3,000 updates, they cost 1.3 points: bench/byzantine.py)."""
    assert fleet_accuracy(0.0, attack) < 0.5
    assert fleet_accuracy(DEFAULT_CLIP_MULTIPLIER, attack) > reference_accuracy("silent") - gap
