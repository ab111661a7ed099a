"""Model quality vs update compression on the demo task, same seed, same run.

A single-process event simulation of the demo's asynchronous job: N devices with
non-IID Dirichlet shards of scikit-learn's digits, C tasks in flight with lognormal
durations (so updates arrive stale and out of order), exact FedAsync with polynomial
staleness from `aggregator.strategies`, local training with `edge_agent.trainers`, and
every update passed through the real codec (`schemas.codec`) with per-device
error-feedback residuals. Each codec setting replays the identical arrival sequence.

    .venv/bin/python bench/bench_quality.py --updates 800 --json
    .venv/bin/python bench/bench_quality.py --updates 2000 --strategy fedasync_delta --seed 1
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
from aggregator.strategies.base import Update
from edge_agent.data import load_digits_split, partition_dirichlet
from edge_agent.trainers import NumpyTrainer, accuracy, train
from schemas import codec
from schemas.messages import CodecConfig, ModelSpecMsg, StrategyConfig, TrainConfig
from schemas.modelspec import init_params

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


def run_variant(cfg: CodecConfig, args: argparse.Namespace) -> dict[str, Any]:
    train_ds, test = load_digits_split(seed=args.seed)
    parts = partition_dirichlet(train_ds.y, args.devices, 0.5, seed=args.seed)
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    x0 = init_params(spec, args.seed)
    strat_cfg = StrategyConfig(
        name=args.strategy,
        alpha=0.6,
        staleness="polynomial",
        staleness_a=0.5,
        max_staleness=10_000,
    )
    strategy = build_strategy(strat_cfg, x0, options=StrategyOptions(history_size=10_000))
    tcfg = TrainConfig(lr=0.5, local_epochs=5, batch_size=8)
    trainer = NumpyTrainer()
    residual: dict[int, np.ndarray] = {}
    # model version each dispatched task trained on: version at dispatch time
    dispatch_version: dict[int, int] = {}
    order = schedule(args.updates, args.devices, args.concurrency, args.seed)
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
        new, _ = train(trainer, spec, base, d.x, d.y, tcfg, seed=args.seed + idx)
        delta = (new - base).astype(np.float32)
        frame, res = codec.encode_with_feedback(delta, residual.get(dev), cfg)
        if cfg.error_feedback:
            residual[dev] = res
        wire += len(frame)
        chunk = codec.decode(frame, delta.size)
        strategy.apply(Update(chunk=chunk, base_version=base_v, num_samples=len(d)))
        snapshots[strategy.version] = strategy.params.copy()
        dispatch_version[next_dispatch] = strategy.version
        next_dispatch += 1
        if n % max(1, args.updates // 10) == 0:
            curve.append((n, accuracy(spec, strategy.params, test.x, test.y)))
    return {
        "accuracy": accuracy(spec, strategy.params, test.x, test.y),
        "bytes_per_update": wire / args.updates,
        "ratio_vs_fp32": (x0.size * 4) / (wire / args.updates),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--updates", type=int, default=800)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--strategy",
        default="fedasync",
        choices=["fedasync", "fedasync_delta"],
        help="exact FedAsync (the demo's rule) or FedAsync-delta (x += a*delta)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = {name: run_variant(cfg, args) for name, cfg in VARIANTS.items()}
    base = results["fp32 dense (uncompressed)"]["accuracy"]
    for name, r in results.items():
        r["accuracy_minus_uncompressed"] = r["accuracy"] - base
        print(
            f"{name:28s} acc {r['accuracy']:.4f} ({r['accuracy_minus_uncompressed']:+.4f})  "
            f"{r['bytes_per_update']:8.1f} B/update  {r['ratio_vs_fp32']:6.1f}x smaller"
        )
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
