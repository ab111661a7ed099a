"""MNIST-1D, centrally: the reference the federated runs are measured against.

Generates (or reads from the cache) the MNIST-1D rows, trains ``sim.cnn1d``'s CNN on them
with Adam and prints test accuracy per epoch, training throughput and wall time.

.venv/bin/python bench/mnist1d_central.py                 # 60,000 train / 10,000 test
.venv/bin/python bench/mnist1d_central.py --epochs 10 --json
"""

from __future__ import annotations

import argparse
import json
import time

from sim.cnn1d import CentralHistory, central_train, export_onnx, make_cnn, num_params
from sim.mnist1d import load_mnist1d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=60_000, help="training rows")
    p.add_argument("--test", type=int, default=10_000, help="test rows")
    p.add_argument("--seed", type=int, default=0, help="data and model seed")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--no-cache", action="store_true", help="generate even when cached")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    args = p.parse_args()
    import torch

    t0 = time.perf_counter()
    data = load_mnist1d(args.train, args.test, seed=args.seed, cache=not args.no_cache)
    how = "read from cache" if data.cached else "generated"
    print(f"data: {len(data.train)} train / {len(data.test)} test rows {how} in "
          f"{data.seconds:.2f} s ({data.path})")  # fmt: skip
    model = make_cnn(args.seed)
    t1 = time.perf_counter()
    onnx_bytes = export_onnx(model)
    print(f"model: {num_params(model):,} parameters, ONNX {len(onnx_bytes):,} bytes "
          f"(export + check {time.perf_counter() - t1:.2f} s), torch threads "
          f"{args.threads or torch.get_num_threads()}")  # fmt: skip

    def report(h: CentralHistory) -> None:
        print(f"epoch {len(h.accuracy):3d}: test accuracy {h.accuracy[-1]:.4f}  "
              f"({h.seconds[-1]:.1f} s, {h.rows / h.seconds[-1]:,.0f} samples/s, "
              f"loss {h.loss[-1]:.4f})", flush=True)  # fmt: skip

    hist = central_train(data.train, data.test, args.epochs, args.seed, batch_size=args.batch,
                         lr=args.lr, model=model, threads=args.threads,
                         on_epoch=report)  # fmt: skip
    wall = time.perf_counter() - t0
    best = max(len(data.train) / s for s in hist.seconds)
    print(f"final test accuracy {hist.accuracy[-1]:.4f} (best {max(hist.accuracy):.4f}); "
          f"training {hist.samples_per_s:,.0f} samples/s (best epoch {best:,.0f}); "
          f"wall {wall:.1f} s")  # fmt: skip
    if args.json:
        print(json.dumps({"train": len(data.train), "test": len(data.test), "seed": args.seed,
                          "generation_s": data.seconds, "cached": data.cached,
                          "params": num_params(model), "epochs": args.epochs,
                          "batch": args.batch, "lr": args.lr, "threads": args.threads,
                          "accuracy": hist.accuracy,
                          "loss": hist.loss, "epoch_s": hist.seconds,
                          "samples_per_s": hist.samples_per_s, "wall_s": wall}))  # fmt: skip


if __name__ == "__main__":
    main()
