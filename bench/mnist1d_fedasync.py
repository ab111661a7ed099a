"""A single-process FedAsync reference on MNIST-1D with the demo's CNN: no servers, no
network — the published rule (Xie et al. 2019: x <- (1 - a) x + a x_new,
a = alpha * (staleness + 1) ** -staleness_a) over a simulated arrival process, to choose
the learning defaults of ``fedfleet demo --task mnist1d``, to compare the real run with,
and to tell whether compressed (top-k int8 + error feedback) updates keep up with dense.

    .venv/bin/python bench/mnist1d_fedasync.py --updates 3000 --seeds 0 1
    .venv/bin/python bench/mnist1d_fedasync.py --updates 3000 --seeds 0 1 --codec topk
    .venv/bin/python bench/mnist1d_fedasync.py --updates 3000 --seeds 0 1 --codec topk \\
        --rule fedasync_delta --alpha 1.0 --staleness-a 0

Devices: Dirichlet(0.5) over labels on 1,000 devices (``edge_agent.data.partition_dirichlet``,
what the simulated fleet uses); ``concurrency`` tasks are in flight, each trained from the
global model of the time it was issued; the one to finish is picked at random (so
staleness ~ concurrency); each trains ``local_epochs`` of ``--optimizer`` (Adam by default;
``momentum``: SGD with momentum, which top-k compression needs, see below) on its rows. The device
picks and the batch orders come from one ``rng`` that the codec never draws from, so every
codec setting with the same seed replays the same arrival process. ``a`` counts staleness
as this module always has: ``(d + 1) ** -staleness_a`` with ``d = t_now - tau``
(``aggregator.strategies`` uses ``d + 2``: its ``t`` is the version being produced).

Codecs (``--codec``):

* ``dense`` (default): the device's fp32 model, mixed in full; bytes = 4 per parameter.
* ``topk``: what the agent sends — ``D = new - base`` cut into ``--shards`` even slices
  (``schemas.modelspec.even_bounds``, as the coordinator cuts them; default 2, the demo's)
  and encoded per slice by ``schemas.codec.encode_update`` (``CodecConfig(topk=--topk,
  quant=--quant, error_feedback=True)``, round-to-nearest like the agent) with the
  device's own residual, kept across its tasks (like the agent's outbox). The frames are
  decoded with ``schemas.codec.decode``. Bytes = the frames' lengths (no message envelope).

  Top-k needs a local optimizer whose deltas are heavy-tailed. Adam normalises every
  coordinate's step, so a device's delta is nearly flat: on this CNN the top 1 % of its
  coordinates carry ~5 % of its squared norm (5 devices, one task each, from the initial
  model), against ~87 % for SGD with momentum 0.9 (lr 0.05 or 0.01). Top-1 % of an Adam
  update throws most of it away (into an error-feedback residual that a device of a
  1,000-device fleet seldom gets to send).

Server rules (``--rule``; this module's own functions, not the aggregator's code):

* ``fedasync`` (default), :func:`mix_support` for a sparse frame (the "support" rule): on
  the coordinates it carries ``x_t = (1 - a) x_{t-1} + a (x_tau + D)``, every other
  coordinate keeps ``x_{t-1}``; ``x_tau`` is the base the task was issued with, held with
  the task (so the history is bounded by ``concurrency``). A dense frame: every coordinate.
* ``fedasync_delta``, :func:`add_delta`: ``x_t = x_{t-1} + a D`` on the coordinates sent.
  With ``--alpha 1.0 --staleness-a 0`` (the job spec's ``staleness: constant``) a sparse
  update is added as it is.

Each seed prints one JSON line: accuracy every ``--every`` updates on the 10,000 test rows,
the first checkpoint at >= 0.90, mean frame bytes per update, the fp32 dense size and the
ratio, wall seconds; stderr gets one line per checkpoint as it is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from schemas.types import F32

Curve = list[tuple[int, float]]
Codec = Literal["dense", "topk"]
Quant = Literal["none", "fp16", "int8"]
Rule = Literal["fedasync", "fedasync_delta"]
Optimizer = Literal["adam", "sgd", "momentum"]  # the job spec's train.optimizer names


@dataclass(frozen=True)
class Result:
    curve: Curve
    bytes_per_update: float  # mean over the run (frames only for topk)
    dense_bytes: int  # fp32 dense: 4 * params
    topk_energy: float  # mean share of a delta's squared norm in its top-``topk`` per shard


def topk_share(d: F32, bounds: list[int], frac: float) -> float:
    """The share of ``||d||^2`` held by the top ``frac`` of each slice's coordinates (by
    magnitude, at least one per slice; ``bounds`` the cut points, as ``even_bounds``
    gives them): what a top-k frame of ``d`` could carry at best."""
    e = d.astype(np.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1.0
    kept = 0.0
    for start, stop in itertools.pairwise(bounds):
        k = max(1, round(frac * (stop - start)))
        kept += float(np.partition(e[start:stop], stop - start - k)[stop - start - k :].sum())
    return kept / total


def mix_support(x: F32, base: F32, idx: npt.NDArray[np.int64], d: F32, a: float) -> None:
    """FedAsync on a sparse update, in place: ``x[idx] = (1 - a) x[idx] + a (base[idx] + d)``;
    coordinates not in ``idx`` keep ``x``."""
    a32 = np.float32(a)
    x[idx] = (np.float32(1.0) - a32) * x[idx] + a32 * (base[idx] + d)


def mix_dense(x: F32, base: F32, d: F32, a: float) -> None:
    """FedAsync on a dense update, in place: ``x = (1 - a) x + a (base + d)``."""
    a32 = np.float32(a)
    x *= np.float32(1.0) - a32
    x += a32 * (base + d)


def add_delta(x: F32, idx: npt.NDArray[np.int64] | None, d: F32, a: float) -> None:
    """Delta-form FedAsync in place: ``x[idx] += a d`` (every coordinate when ``idx`` is
    None); no ``x_tau`` involved."""
    a32 = np.float32(a)
    if idx is None:
        x += a32 * d
    else:
        x[idx] += a32 * d


def run(seed: int, *, updates: int, lr: float, local_epochs: int, batch: int, alpha: float,
        staleness_a: float, concurrency: int, devices: int, every: int, codec: Codec = "dense",
        topk: float = 0.01, quant: Quant = "int8", shards: int = 2, rule: Rule = "fedasync",
        optimizer: Optimizer = "adam", momentum: float = 0.9,
        on_checkpoint: Callable[[int, float], None] | None = None) -> Result:  # fmt: skip
    import torch

    from edge_agent.data import partition_dirichlet
    from schemas.codec import CodecConfig, decode, encode_update
    from schemas.modelspec import even_bounds
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
    n = int(flat.numel())
    bounds = even_bounds(n, shards)
    cfg = CodecConfig(topk=topk, quant=quant, error_feedback=True)
    residuals: dict[int, F32] = {}  # per device, across its tasks (like the agent's outbox)
    rng = np.random.default_rng(seed)
    version = 0
    sent = 0
    shares: list[float] = []

    def train(base: torch.Tensor, dev: int) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(base.clone(), model.parameters())
        opt: torch.optim.Optimizer
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        else:  # plain SGD, or SGD with momentum (torch's rule, as the device's trainer)
            mom = momentum if optimizer == "momentum" else 0.0
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
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

    def apply_topk(x: F32, base: F32, new: F32, dev: int, a: float) -> int:
        """Encode the device's delta like the agent, mix the decoded frames; frame bytes."""
        frames, residuals[dev] = encode_update(new - base, bounds, cfg, residuals.get(dev))
        for _, start, stop, frame in frames:
            chunk = decode(frame, stop - start)
            xs, bs = x[start:stop], base[start:stop]  # views: mixing writes into x
            if rule == "fedasync_delta":
                add_delta(xs, chunk.indices, chunk.values, a)
            elif chunk.indices is not None:
                mix_support(xs, bs, chunk.indices, chunk.values, a)
            else:
                mix_dense(xs, bs, chunk.values, a)
        return sum(len(f) for *_, f in frames)

    flight = [(flat.clone(), 0, int(rng.integers(devices))) for _ in range(concurrency)]
    out = []
    for u in range(1, updates + 1):
        base, base_v, dev = flight.pop(int(rng.integers(len(flight))))
        new = train(base, dev)
        shares.append(topk_share((new - base).numpy(), bounds, topk))
        a = alpha * (version - base_v + 1) ** -staleness_a
        if codec == "dense" and rule == "fedasync":
            flat = (1 - a) * flat + a * new
            sent += 4 * n
        elif codec == "dense":
            flat = flat + a * (new - base)
            sent += 4 * n
        else:
            sent += apply_topk(flat.numpy(), base.numpy(), new.numpy(), dev, a)
        version += 1
        flight.append((flat.clone(), version, int(rng.integers(devices))))
        if u % every == 0:
            out.append((u, accuracy(flat)))
            if on_checkpoint is not None:
                on_checkpoint(*out[-1])
    return Result(out, sent / max(1, updates), 4 * n, float(np.mean(shares)))


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
    p.add_argument("--codec", choices=["dense", "topk"], default="dense")
    p.add_argument("--topk", type=float, default=0.01, help="fraction kept per shard (topk)")
    p.add_argument("--quant", choices=["int8", "fp16", "none"], default="int8")
    p.add_argument("--shards", type=int, default=2, help="slices encoded apart (topk)")
    p.add_argument("--rule", choices=["fedasync", "fedasync_delta"], default="fedasync")
    p.add_argument("--optimizer", choices=["adam", "sgd", "momentum"], default="adam",
                   help="the devices' local optimizer, as train.optimizer names it "
                        "(momentum: SGD with --momentum)")
    p.add_argument("--momentum", type=float, default=0.9, help="for --optimizer momentum")
    a = p.parse_args()
    for seed in a.seeds:
        t0 = time.perf_counter()

        def progress(u: int, acc: float, seed: int = seed, t0: float = t0) -> None:
            dt = time.perf_counter() - t0
            tag = f"seed {seed} {a.codec} {a.rule} alpha {a.alpha}"
            print(f"{tag}: {u} updates {acc:.4f} ({dt:.0f} s)", file=sys.stderr)

        res = run(seed, updates=a.updates, lr=a.lr, local_epochs=a.local_epochs,
                  batch=a.batch, alpha=a.alpha, staleness_a=a.staleness_a,
                  concurrency=a.concurrency, devices=a.devices, every=a.every,
                  codec=a.codec, topk=a.topk, quant=a.quant, shards=a.shards,
                  rule=a.rule, optimizer=a.optimizer, momentum=a.momentum,
                  on_checkpoint=progress)  # fmt: skip
        hist = [(u, round(acc, 4)) for u, acc in res.curve]
        first = next((u for u, acc in hist if acc >= 0.90), None)
        setting = {"codec": a.codec, "rule": a.rule, "alpha": a.alpha, "lr": a.lr,
                   "optimizer": a.optimizer, "momentum": a.momentum,
                   "staleness_a": a.staleness_a, "concurrency": a.concurrency}  # fmt: skip
        if a.codec == "topk":
            setting |= {"topk": a.topk, "quant": a.quant, "shards": a.shards}
        print(json.dumps({"seed": seed, **setting, "accuracy_by_updates": hist,
                          "first_at_0.90": first,
                          "bytes_per_update": round(res.bytes_per_update, 1),
                          "fp32_dense_bytes": res.dense_bytes,
                          "x_smaller_than_fp32": round(res.dense_bytes / res.bytes_per_update, 1),
                          "topk_energy_share": round(res.topk_energy, 4),
                          "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
