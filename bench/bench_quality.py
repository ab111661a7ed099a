"""Model quality vs update compression on the demo task, same seeds, same run.

A single-process event simulation of the demo's asynchronous job: N devices with
non-IID Dirichlet shards of scikit-learn's digits, C tasks in flight with lognormal
durations (so updates arrive stale and out of order), exact FedAsync with polynomial
staleness from `aggregator.strategies`, local training with `edge_agent.trainers`, and
every update cut into the demo's shard chunks and passed through the real codec
(`schemas.codec.encode_update`, per-device error-feedback residuals). Each codec setting
replays the identical arrival sequence. The rule is coordinate-wise and every update
carries all shards at one base version, so the shards' slices are applied as one vector.

"final" is the test accuracy after the last update; "last-3" is the mean of the last
three of ten evenly spaced checkpoints (the last 30% of training), which is less exposed
to the checkpoint-to-checkpoint noise of a 450-sample test set (±0.5–1 point).

    .venv/bin/python bench/bench_quality.py --seeds 0,1,2,3,4 --json
    .venv/bin/python bench/bench_quality.py --updates 2000 --sparse-mix all --seeds 0
    .venv/bin/python bench/bench_quality.py --strategy fedasync_delta --seeds 1
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from typing import Any

import numpy as np

from aggregator.strategies import StrategyOptions, build_strategy
from aggregator.strategies.base import Chunk, Update
from edge_agent.data import load_digits_split, partition_dirichlet
from edge_agent.trainers import NumpyTrainer, accuracy, train
from schemas import codec
from schemas.messages import CodecConfig, ModelSpecMsg, StrategyConfig, TrainConfig
from schemas.modelspec import even_bounds, init_params

VARIANTS: dict[str, CodecConfig] = {
    "fp32 dense (uncompressed)": CodecConfig(topk=0.0, quant="none", error_feedback=False),
    "int8 dense": CodecConfig(topk=0.0, quant="int8", error_feedback=False),
    "top-10% int8 + EF": CodecConfig(topk=0.10, quant="int8", error_feedback=True),
    "top-1% int8 + EF": CodecConfig(topk=0.01, quant="int8", error_feedback=True),
    "top-1% int8, no EF": CodecConfig(topk=0.01, quant="int8", error_feedback=False),
}


def schedule(n_updates: int, devices: int, concurrency: int, seed: int) -> list[tuple[int, int]]:
    """(device, dispatch_index) in arrival order; dispatch_index says which model it saw."""
    rng = random.Random(seed)
    heap: list[tuple[float, int, int]] = []
    dispatched = 0
    now = 0.0
    for _ in range(concurrency):
        heapq.heappush(heap, (now + rng.lognormvariate(0, 0.8), dispatched, rng.randrange(devices)))
        dispatched += 1
    order: list[tuple[int, int]] = []
    while len(order) < n_updates:
        now, idx, dev = heapq.heappop(heap)
        order.append((dev, idx))
        heapq.heappush(heap, (now + rng.lognormvariate(0, 0.8), dispatched, rng.randrange(devices)))
        dispatched += 1
    return order


def decode_all(frames: list[codec.ShardFrame], length: int) -> Chunk:
    """The shards' decoded chunks as one chunk of the whole vector (sparse if all are)."""
    parts = [(start, codec.decode(frame, stop - start)) for _, start, stop, frame in frames]
    if any(c.indices is None for _, c in parts):
        return Chunk.dense(np.concatenate([c.to_dense() for _, c in parts]))
    idx = np.concatenate([start + c.indices for start, c in parts if c.indices is not None])
    return Chunk.sparse(length, idx, np.concatenate([c.values for _, c in parts]))


def run_variant(cfg: CodecConfig, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    train_ds, test = load_digits_split(seed=seed)
    parts = partition_dirichlet(train_ds.y, args.devices, 0.5, seed=seed)
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    x0 = init_params(spec, seed)
    bounds = even_bounds(x0.size, args.shards)
    strat_cfg = StrategyConfig(
        name=args.strategy,
        alpha=0.6,
        staleness="polynomial",
        staleness_a=0.5,
        max_staleness=10_000,
        sparse_mix=args.sparse_mix,
    )
    strategy = build_strategy(strat_cfg, x0, options=StrategyOptions(history_size=10_000))
    tcfg = TrainConfig(lr=0.5, local_epochs=5, batch_size=8)
    trainer = NumpyTrainer()
    residual: dict[int, np.ndarray] = {}
    # model version each dispatched task trained on: version at dispatch time
    dispatch_version: dict[int, int] = {}
    order = schedule(args.updates, args.devices, args.concurrency, seed)
    next_dispatch = args.concurrency
    for i in range(args.concurrency):
        dispatch_version[i] = 0
    snapshots: dict[int, np.ndarray] = {0: strategy.params.copy()}
    wire = 0
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for n, (dev, idx) in enumerate(order, 1):
        base_v = dispatch_version.pop(idx)
        base = snapshots[base_v]
        d = train_ds.subset(parts[dev])
        new, _ = train(trainer, spec, base, d.x, d.y, tcfg, seed=seed + idx)
        delta = (new - base).astype(np.float32)
        frames, res = codec.encode_update(delta, bounds, cfg, residual.get(dev))
        if cfg.error_feedback:
            residual[dev] = res
        wire += sum(len(f[3]) for f in frames)
        chunk = decode_all(frames, delta.size)
        strategy.apply(Update(chunk=chunk, base_version=base_v, num_samples=len(d)))
        snapshots[strategy.version] = strategy.params.copy()
        dispatch_version[next_dispatch] = strategy.version
        next_dispatch += 1
        if n % max(1, args.updates // 10) == 0:
            curve.append((n, accuracy(spec, strategy.params, test.x, test.y)))
    return {
        "accuracy": accuracy(spec, strategy.params, test.x, test.y),
        "last3": float(np.mean([a for _, a in curve[-3:]])),
        "bytes_per_update": wire / args.updates,
        "ratio_vs_fp32": (x0.size * 4) / (wire / args.updates),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--shards", type=int, default=2, help="model shards (the demo has 2)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2,3,4")
    p.add_argument(
        "--strategy",
        default="fedasync",
        choices=["fedasync", "fedasync_delta"],
        help="exact FedAsync (the demo's rule) or FedAsync-delta (x += a*delta)",
    )
    p.add_argument(
        "--sparse-mix",
        default="support",
        choices=["support", "all"],
        help="exact FedAsync on sparse updates: mix sent coordinates only (default) or all",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = {seed: {name: run_variant(cfg, args, seed) for name, cfg in VARIANTS.items()}
            for seed in seeds}  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        per_seed = []
        for seed in seeds:
            r, base = runs[seed][name], runs[seed]["fp32 dense (uncompressed)"]
            r["final_minus_uncompressed"] = r["accuracy"] - base["accuracy"]
            r["last3_minus_uncompressed"] = r["last3"] - base["last3"]
            per_seed.append(r)
        summary[name] = {
            "bytes_per_update": float(np.mean([r["bytes_per_update"] for r in per_seed])),
            "ratio_vs_fp32": float(np.mean([r["ratio_vs_fp32"] for r in per_seed])),
            "final": [r["accuracy"] for r in per_seed],
            "final_gap": [r["final_minus_uncompressed"] for r in per_seed],
            "last3_gap": [r["last3_minus_uncompressed"] for r in per_seed],
        }
        m = summary[name]
        m["mean_final_gap"] = float(np.mean(m["final_gap"]))
        m["mean_last3_gap"] = float(np.mean(m["last3_gap"]))
        print(
            f"{name:28s} {m['bytes_per_update']:7.1f} B/update {m['ratio_vs_fp32']:6.1f}x  "
            f"final gap {' '.join(f'{100 * g:+.1f}' for g in m['final_gap'])} "
            f"(mean {100 * m['mean_final_gap']:+.2f})  last-3 gap mean "
            f"{100 * m['mean_last3_gap']:+.2f} points"
        )
    if args.json:
        out = {"args": vars(args), "summary": summary,
               "runs": {str(s): r for s, r in runs.items()}}  # fmt: skip
        print(json.dumps(out))


if __name__ == "__main__":
    main()
