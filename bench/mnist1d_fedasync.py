"""A single-process FedAsync reference on MNIST-1D with the demo's CNN: no servers, no
codec, no network — the published rule (Xie et al. 2019: x <- (1 - a) x + a x_new,
a = alpha * (staleness + 1) ** -staleness_a) over a simulated arrival process, to choose
the learning defaults of ``fedfleet demo --task mnist1d`` and to compare the real run with.

    .venv/bin/python bench/mnist1d_fedasync.py --updates 3000 --seeds 0 1

Devices: Dirichlet(0.5) over labels on 1,000 devices (``edge_agent.data.partition_dirichlet``,
what the simulated fleet uses); ``concurrency`` tasks are in flight, each trained from the
global model of the time it was issued; the one to finish is picked at random (so
staleness ~ concurrency); each trains ``local_epochs`` of Adam on its rows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

Curve = list[tuple[int, float]]


def run(seed: int, *, updates: int, lr: float, local_epochs: int, batch: int, alpha: float,
        staleness_a: float, concurrency: int, devices: int, every: int) -> Curve:  # fmt: skip
    import torch

    from edge_agent.data import partition_dirichlet
    from sim.cnn1d import make_cnn
    from sim.mnist1d import load_mnist1d

    torch.set_num_threads(1)
    data = load_mnist1d()
    tr, te = data.train, data.test
    parts = partition_dirichlet(tr.y, devices, 0.5, seed=seed)
    xt, yt = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    xe, ye = torch.from_numpy(te.x), torch.from_numpy(te.y)
    model = make_cnn(seed)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    rng = np.random.default_rng(seed)
    version = 0

    def train(base: torch.Tensor, dev: int) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(base.clone(), model.parameters())
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(local_epochs):
            order = rng.permutation(parts[dev])
            for a in range(0, len(order), batch):
                b = torch.from_numpy(order[a : a + batch])
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def accuracy(v: torch.Tensor) -> float:
        torch.nn.utils.vector_to_parameters(v.clone(), model.parameters())
        with torch.no_grad():
            return float((model(xe).argmax(1) == ye).float().mean())

    flight = [(flat.clone(), 0, int(rng.integers(devices))) for _ in range(concurrency)]
    out = []
    for u in range(1, updates + 1):
        base, base_v, dev = flight.pop(int(rng.integers(len(flight))))
        new = train(base, dev)
        a = alpha * (version - base_v + 1) ** -staleness_a
        flat = (1 - a) * flat + a * new
        version += 1
        flight.append((flat.clone(), version, int(rng.integers(devices))))
        if u % every == 0:
            out.append((u, accuracy(flat)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--staleness-a", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--every", type=int, default=250)
    a = p.parse_args()
    for seed in a.seeds:
        t0 = time.perf_counter()
        hist = run(seed, updates=a.updates, lr=a.lr, local_epochs=a.local_epochs,
                   batch=a.batch, alpha=a.alpha, staleness_a=a.staleness_a,
                   concurrency=a.concurrency, devices=a.devices, every=a.every)  # fmt: skip
        first = next((u for u, acc in hist if acc >= 0.90), None)
        print(json.dumps({"seed": seed, "accuracy_by_updates": hist, "first_at_0.90": first,
                          "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
