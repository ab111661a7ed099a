"""The cost of Byzantine devices on the demo task, with and without the adaptive bound.

A single-process event simulation of the demo's asynchronous job (as
``bench/bench_quality.py``): N devices with non-IID Dirichlet(0.5) shards of scikit-learn's
digits, C tasks in flight with lognormal durations (updates arrive stale and out of
order), local training with the product's numpy trainer, every update encoded with the
demo's codec (int8, dense, error feedback; ``schemas.codec.encode_update``) and cut into
the demo's shard chunks, and one product strategy per shard
(``aggregator.strategies.build_strategy``: exact FedAsync, alpha 0.6, polynomial a 0.5),
so the adaptive bound is per slice as on the real shards.

A fixed ``--byzantine`` share of the devices (20%) upload forged models through
``sim.byzantine.ByzantineTrainer``: ``sign_flip`` (-4 x delta), ``scaled`` (100 x delta),
``random`` (Gaussian of L2 norm 100) and ``bias`` (+1e4 on one output bias). Every setting
of a seed replays the identical arrival sequence and Byzantine set; "off" is
``clip_multiplier = 0`` (the rule before this change), the others are the adaptive bound
at that multiplier.

    .venv/bin/python bench/byzantine.py --seeds 0,1,2 --json
    .venv/bin/python bench/byzantine.py --seeds 0 --multipliers 1.5,2,3,5 --attacks none
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any, cast

import numpy as np
from bench_quality import schedule  # the same arrival sequence as the quality bench

from aggregator.strategies import StrategyOptions, build_strategy
from aggregator.strategies.adaptive import AdaptiveClip
from aggregator.strategies.base import Strategy, Update, Wrapper
from edge_agent.data import load_digits_split, partition_dirichlet
from edge_agent.trainers import NumpyTrainer, Trainer, accuracy, train
from schemas import codec
from schemas.messages import CodecConfig, ModelSpecMsg, StrategyConfig, TrainConfig
from schemas.modelspec import even_bounds, init_params
from sim.byzantine import ATTACKS, Attack, AttackKind, ByzantineTrainer

SPEC = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
TRAIN = TrainConfig(lr=0.5, local_epochs=5, batch_size=8)  # the demo's
CODEC = CodecConfig(topk=0.0, quant="int8")  # the demo's (error feedback on)


def run(args: argparse.Namespace, seed: int, attack: str, multiplier: float) -> dict[str, Any]:
    train_ds, test = load_digits_split(seed=seed)
    parts = partition_dirichlet(train_ds.y, args.devices, 0.5, seed=seed)
    byz = set(np.random.default_rng([seed, 7]).choice(
        args.devices, size=round(args.byzantine * args.devices), replace=False
    ).tolist()) if attack != "none" else set()  # fmt: skip
    x0 = init_params(SPEC, seed)
    bounds = even_bounds(x0.size, args.shards)
    cfg = StrategyConfig(
        name="fedasync", alpha=0.6, staleness="polynomial", staleness_a=0.5,
        max_staleness=10_000, clip_multiplier=multiplier, clip_window=args.window,
    )  # fmt: skip
    opts = StrategyOptions(history_size=10_000)
    shards: list[Strategy] = [
        build_strategy(cfg, x0[lo:hi], options=opts) for lo, hi in itertools.pairwise(bounds)
    ]
    honest = NumpyTrainer()
    forged: Trainer = honest
    if attack != "none":
        k = args.sign_flip_k
        forged = ByzantineTrainer(honest, Attack(kind=cast(AttackKind, attack), sign_flip_k=k))
    residual: dict[int, np.ndarray] = {}
    dispatch_version = dict.fromkeys(range(args.concurrency), 0)
    next_dispatch = args.concurrency
    snapshots: dict[int, np.ndarray] = {0: x0.copy()}
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def model() -> np.ndarray:
        return np.concatenate([s.params for s in shards])

    order = schedule(args.updates, args.devices, args.concurrency, seed)
    for n, (dev, idx) in enumerate(order, 1):
        base_v = dispatch_version.pop(idx)
        base = snapshots[base_v]
        d = train_ds.subset(parts[dev])
        trainer = forged if dev in byz else honest
        new, _ = train(trainer, SPEC, base, d.x, d.y, TRAIN, seed=seed * 100_003 + idx)
        delta = (new - base).astype(np.float32)
        frames, res = codec.encode_update(delta, bounds, CODEC, residual.get(dev))
        residual[dev] = res
        for s, (_, start, stop, frame) in zip(shards, frames, strict=True):
            chunk = codec.decode(frame, stop - start)
            s.apply(Update(chunk, base_v, len(d), f"u{n}"))
        version = shards[0].version
        snapshots[version] = model()
        dispatch_version[next_dispatch] = version
        next_dispatch += 1
        if n % max(1, args.updates // 10) == 0:
            curve.append((n, accuracy(SPEC, model(), test.x, test.y)))
    clipped = sum(_clipped(s) for s in shards)
    return {
        "accuracy": accuracy(SPEC, model(), test.x, test.y),
        "last3": float(np.mean([a for _, a in curve[-3:]])),
        "clipped_share": clipped / (len(shards) * args.updates),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def _clipped(s: Strategy) -> int:
    """Updates the shard's adaptive bound scaled down (0 without one)."""
    while isinstance(s, Wrapper):
        if isinstance(s, AdaptiveClip):
            return s.clipped
        s = s.inner
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--shards", type=int, default=2, help="model shards (the demo has 2)")
    p.add_argument("--byzantine", type=float, default=0.2, help="share of Byzantine devices")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--multipliers", default="3", help="clip_multiplier values besides 0 (off)")
    p.add_argument("--window", type=int, default=100, help="clip_window")
    p.add_argument("--sign-flip-k", type=float, default=4.0, help="sign_flip uploads -k x delta")
    p.add_argument("--attacks", default="none," + ",".join(ATTACKS),
                   help="'none' (clean) and/or " + ", ".join(ATTACKS))  # fmt: skip
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    mults = [0.0] + [float(m) for m in args.multipliers.split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for attack in attacks:
        for m in mults:
            label = "off" if m == 0 else f"m={m:g}"
            rs = [run(args, seed, attack, m) for seed in seeds]
            results.setdefault(attack, {})[label] = rs
            accs = " / ".join(f"{r['accuracy']:.4f}" for r in rs)
            l3 = " / ".join(f"{r['last3']:.4f}" for r in rs)
            clip = np.mean([r["clipped_share"] for r in rs])
            mean = np.mean([r["accuracy"] for r in rs])
            print(f"{attack:9s} {label:6s} final {accs}  mean {mean:.4f}"
                  f"  last-3 {l3}  clipped {100 * clip:.1f}%  "
                  f"({np.mean([r['seconds'] for r in rs]):.1f} s/run)", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
