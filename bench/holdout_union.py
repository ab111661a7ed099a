"""Score a demo's final ONNX model on the rows federated evaluation reads: the union of the
simulated devices' held-out splits, next to the central test split and the devices'
training rows. Rebuilds the digits demo's partition exactly (same seed, 200 devices,
Dirichlet 0.5, the agents' ``eval_fraction`` 0.2 and device ids).

    .venv/bin/fedfleet demo --seed 1 --json --out /tmp/dg1 | tail -1
    .venv/bin/python bench/holdout_union.py --seed 1 /tmp/dg1/digits.onnx

If the demo's final federated figure equals the model's accuracy on the union of held-out
rows, the evaluation pipeline is right and any gap to the central figure is the sample.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort

from edge_agent.data import Dataset, load_digits_split, partition_dirichlet
from edge_agent.holdout import split_holdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("onnx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    a = p.parse_args()
    train, test = load_digits_split(seed=a.seed)
    parts = partition_dirichlet(train.y, a.devices, a.alpha, seed=a.seed)
    sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])

    def acc(ds: Dataset) -> dict[str, float | int]:
        z = sess.run(["logits"], {"x": ds.x.astype(np.float32)})[0]
        return {"accuracy": round(float((z.argmax(1) == ds.y).mean()), 4), "rows": len(ds)}

    held, trained = [], []
    for i, idx in enumerate(parts):
        sp = split_holdout(train.subset(idx), a.eval_fraction, f"dev-{i:06d}")
        held.append(sp.holdout)
        trained.append(sp.train)

    def union(xs: list[Dataset]) -> Dataset:
        return Dataset(np.concatenate([d.x for d in xs]), np.concatenate([d.y for d in xs]))

    print(json.dumps({"central_test": acc(test), "union_of_holdouts": acc(union(held)),
                      "union_of_training_rows": acc(union(trained))}))  # fmt: skip


if __name__ == "__main__":
    main()
