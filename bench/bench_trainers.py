"""Local training throughput: `TorchTrainer` vs `NumpyTrainer`, same data, same run.

.venv/bin/python bench/bench_trainers.py --json      # needs `pip install 'fedfleet[torch]'`
"""

from __future__ import annotations

import argparse
import json
import time

from edge_agent.data import load_digits_split
from edge_agent.trainers import NumpyTrainer, train
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import init_params


def throughput(trainer: object, batch: int, epochs: int, repeats: int) -> float:
    data, _ = load_digits_split()
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    cfg = TrainConfig(lr=0.1, local_epochs=epochs, batch_size=batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        train(trainer, spec, init_params(spec), data.x, data.y, cfg, seed=0)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - t0)
    return len(data) * epochs / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from edge_agent.torch_trainer import TorchTrainer

    rows = []
    for batch in (32, 256):
        np_rate = throughput(NumpyTrainer(), batch, args.epochs, args.repeats)
        th_rate = throughput(TorchTrainer(), batch, args.epochs, args.repeats)
        rows.append({"batch": batch, "numpy_sps": np_rate, "torch_sps": th_rate,
                     "torch_over_numpy": th_rate / np_rate})  # fmt: skip
        print(f"batch {batch:4d}: numpy {np_rate / 1e6:.3f} M/s  torch {th_rate / 1e6:.3f} M/s"
              f"  ratio {th_rate / np_rate:.2f}")  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
