"""PyTorch trainers vs a bare torch loop: samples/s on the same model and data, same run.

.venv/bin/python bench/torch_trainer.py            # needs `pip install 'fedfleet[torch]'`
.venv/bin/python bench/torch_trainer.py --quick --json

Rows: ``TorchTrainer`` on the built-in ``mlp`` family; ``OnnxTorchTrainer`` on that
family's ONNX artifact (MatMul/Add), on a Conv1d net exported with ``torch.onnx.export``,
and on the same net as ``torch_module``. Each is timed against a bare loop on the
equivalent ``nn.Module`` (``randperm`` batches, ``torch.optim.SGD``, cross-entropy,
``loss.item()`` per step), one torch thread for all, best of ``--repeats`` interleaved
runs. The ratio is trainer / bare (the issue's target: >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_agent.data import load_digits_split
from edge_agent.onnx_trainer import OnnxTorchTrainer
from edge_agent.torch_trainer import TorchTrainer
from edge_agent.trainers import Labels
from schemas.artifact import builtin_artifact, initial_flat, normalize, spec_for
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import init_params, unflatten
from schemas.types import F32

HIDDEN = 64


class ConvNet(nn.Module):
    """Conv1d(1->16, k5) -> ReLU -> Conv1d(16->16, k5) -> ReLU -> Linear(-> 10) on [N, 1, 64]."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 5, padding=2)
        self.fc = nn.Linear(16 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))
        return out


def make_conv() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def bare(module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> float:
    """A plain training loop; returns seconds."""
    module.eval()
    opt = torch.optim.SGD(module.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    n, total = x.shape[0], 0.0
    t0 = time.perf_counter()
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.item()
    return time.perf_counter() - t0


def timed(start: Callable[[], object]) -> float:
    """Seconds to run a ``TrainRun`` from ``start()`` to the end (start included)."""
    t0 = time.perf_counter()
    run = start()
    while not run.step(64):  # type: ignore[attr-defined]
        pass
    return time.perf_counter() - t0


def _mlp_module(spec: ModelSpecMsg, flat: F32) -> nn.Module:
    p = unflatten(spec, flat)
    first, second = nn.Linear(spec.n_features, HIDDEN), nn.Linear(HIDDEN, 10)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(p["W1"].T.copy()))
        first.bias.copy_(torch.from_numpy(p["b1"]))
        second.weight.copy_(torch.from_numpy(p["W2"].T.copy()))
        second.bias.copy_(torch.from_numpy(p["b2"]))
    return nn.Sequential(first, nn.ReLU(), second)


def _export_conv(tmp: Path) -> bytes:
    path = tmp / "conv.onnx"
    torch.onnx.export(
        make_conv().eval(),
        (torch.zeros(2, 1, 64),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("N")},),
        external_data=False,
    )
    return path.read_bytes()


def cases(
    tmp: Path, x: F32, y: Labels
) -> list[tuple[str, Callable[..., float], Callable[..., float]]]:
    """(name, trainer run, bare run) per row; both take a TrainConfig."""
    spec = ModelSpecMsg(family="mlp", n_features=64, n_classes=10, hidden=HIDDEN)
    flat = init_params(spec, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    builtin = normalize(builtin_artifact(spec, seed=0))
    mlp_onnx = spec_for(builtin)
    conv = normalize(_export_conv(tmp))
    conv_spec = spec_for(conv)
    conv_mod = spec_for(conv, torch_module=f"{__name__}:make_conv")
    conv_base = initial_flat(conv.data, conv.params)
    tt, ot = TorchTrainer(threads=1), OnnxTorchTrainer(threads=1)
    x3 = xt.view(-1, 1, 64)

    def onnx_run(s: ModelSpecMsg, data: bytes, base: F32) -> Callable[[TrainConfig], float]:
        return lambda cfg: timed(lambda: ot.start(s, base, x, y, cfg, artifact=data))

    return [
        ("mlp TorchTrainer", lambda cfg: timed(lambda: tt.start(spec, flat, x, y, cfg)),
         lambda cfg: bare(_mlp_module(spec, flat), xt, yt, cfg)),
        ("mlp OnnxTorchTrainer", onnx_run(mlp_onnx, builtin.data, flat),
         lambda cfg: bare(_mlp_module(spec, flat), xt, yt, cfg)),
        ("conv OnnxTorchTrainer", onnx_run(conv_spec, conv.data, conv_base),
         lambda cfg: bare(make_conv(), x3, yt, cfg)),
        ("conv torch_module", onnx_run(conv_mod, conv.data, conv_base),
         lambda cfg: bare(make_conv(), x3, yt, cfg)),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="1 epoch, 2 repeats")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    epochs, repeats = (1, 2) if args.quick else (args.epochs, args.repeats)
    torch.set_num_threads(1)
    data, _ = load_digits_split()
    x, y = np.ascontiguousarray(data.x, dtype=np.float32), data.y
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = cases(Path(tmp), x, y)
        for batch in (32, 256):
            cfg = TrainConfig(lr=0.05, local_epochs=epochs, batch_size=batch)
            for name, trainer_run, bare_run in table:
                best_t = best_b = float("inf")
                for _ in range(repeats):  # interleaved: both see the same machine load
                    best_t = min(best_t, trainer_run(cfg))
                    best_b = min(best_b, bare_run(cfg))
                sps_t, sps_b = len(x) * epochs / best_t, len(x) * epochs / best_b
                rows.append({"case": name, "batch": batch, "trainer_sps": sps_t,
                             "bare_sps": sps_b, "ratio": sps_t / sps_b})  # fmt: skip
                print(f"batch {batch:4d}  {name:22s} trainer {sps_t / 1e3:8.1f} k/s  "
                      f"bare {sps_b / 1e3:8.1f} k/s  ratio {sps_t / sps_b:.2f}")  # fmt: skip
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"epochs": epochs, "repeats": repeats, "rows": rows}))


if __name__ == "__main__":
    main()
