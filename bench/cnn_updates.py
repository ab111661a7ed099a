"""Real model updates for ``bench/bench_aggregator.py --updates-from mnist1d``.

The MNIST-1D 1D CNN (``sim.cnn1d.make_cnn``, 102,282 parameters) trained the way the demo's
devices train it (``fedfleet demo --task mnist1d``: Adam lr 2e-3, 3 local epochs, batch 16,
Dirichlet(0.5) over labels on 1,000 devices, ``edge_agent.data.partition_dirichlet``),
encoded the way devices encode (``schemas.codec.encode_update`` with the job's shard bounds
and a per-device error-feedback residual), over a FedAsync trajectory like the real run's:
``concurrency`` tasks in flight, each trained from the global model of the time it was
issued, the one to finish picked at random, and the server mixing what it *decodes*
(x <- (1 - a) x + a (base + decoded), a = alpha (staleness + 1) ** -staleness_a; as in
``bench/mnist1d_fedasync.py``). So each codec has its own trajectory: top-1% updates move
the model less, and the later deltas show it.

    real = load_updates(GenSettings(updates=400, shards=1), "topk0.01-int8")
    real.updates[i].frames  # one codec frame per shard (even_bounds, as the coordinator cuts)

Codec names: those of ``fedfleet loadtest train --codecs`` (``sim.tasks.codec_of``: ``fp32``,
``fp16``, ``int8``, ``topk<F>-<quant>``); error feedback on, the rest the defaults.

Cached as ``<cache>/bench/cnn-updates-<digest>.npz`` (``<cache>``: ``$FEDFLEET_CACHE`` or
``~/.cache/fedfleet``), keyed by the settings, the codec, the torch and MNIST-1D versions;
a hit needs neither torch nor training. The vector is ``parameters_to_vector`` of the
module, checked to be the ONNX spec's flat order.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from schemas import codec
from schemas.atomic import atomic_write
from schemas.messages import CodecConfig, ModelSpecMsg
from schemas.modelspec import even_bounds, num_params
from schemas.types import F32
from sim.tasks import codec_of
from stack.kafka import cache_root

CACHE_FORMAT = 1  # bump when the cached layout or the generation changes
TORCH_MODULE = "sim.cnn1d:make_cnn"


@dataclass(frozen=True, slots=True)
class GenSettings:
    updates: int = 400
    shards: int = 1  # the model cut with even_bounds (the coordinator's default split)
    devices: int = 1000
    seed: int = 0  # model init, fleet split, device picks, batch order
    lr: float = 2e-3
    local_epochs: int = 3
    batch_size: int = 16
    alpha: float = 0.6
    staleness_a: float = 0.5
    concurrency: int = 10
    dirichlet_alpha: float = 0.5


@dataclass(frozen=True, slots=True)
class RealUpdate:
    device: int
    num_samples: int
    frames: tuple[bytes, ...]  # one per shard


@dataclass(frozen=True, slots=True)
class RealUpdates:
    codec_name: str
    codec: CodecConfig
    spec: ModelSpecMsg  # family onnx
    artifact: bytes  # the normalised ONNX (``schemas.artifact.normalize``)
    bounds: list[int]
    updates: list[RealUpdate]
    meta: dict[str, Any]  # generation figures (seconds, losses, final test accuracy)
    seconds: float  # this call: generation, or reading the cache
    cached: bool

    def stats(self) -> dict[str, Any]:
        """Frame bytes per update (all shards) and of shard 0, dense fp32 for scale."""
        total = np.array([sum(len(f) for f in u.frames) for u in self.updates], dtype=np.float64)
        s0 = np.array([len(u.frames[0]) for u in self.updates], dtype=np.float64)
        n = self.bounds[-1]
        return {
            "updates": len(self.updates),
            "num_params": n,
            "shards": len(self.bounds) - 1,
            "mean_frame_bytes": round(float(total.mean()), 1),
            "min_frame_bytes": int(total.min()),
            "max_frame_bytes": int(total.max()),
            "mean_shard0_frame_bytes": round(float(s0.mean()), 1),
            "vs_fp32_raw": round(float(total.mean()) / (4 * n), 4),
            "mean_num_samples": round(float(np.mean([u.num_samples for u in self.updates])), 1),
            "cached": self.cached,
            "load_s": round(self.seconds, 2),
            **self.meta,
        }


def parse_codec(name: str) -> CodecConfig:
    """``sim.tasks.codec_of``'s names (``fp32``, ``int8``, ``topk0.01-int8``, ...)."""
    return CodecConfig(**codec_of(name))


def cache_path(s: GenSettings, cfg: CodecConfig) -> Path:
    from sim.mnist1d import args_digest, dataset_args

    key = {
        "format": CACHE_FORMAT,
        "settings": asdict(s),
        "codec": msgspec.to_builtins(cfg),
        "torch": metadata.version("torch"),
        "mnist1d": args_digest(dataset_args(), 60_000),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "bench" / f"cnn-updates-{digest}.npz"


def load_updates(s: GenSettings, codec_name: str, *, cache: bool = True) -> RealUpdates:
    """The cached updates for ``(s, codec_name)``, generated (and cached) on a miss."""
    cfg = parse_codec(codec_name)
    path = cache_path(s, cfg)
    t0 = time.perf_counter()
    if cache and path.exists():
        got = _read(path, codec_name, cfg)
        if got is not None:
            return replace(got, seconds=time.perf_counter() - t0)
    spec, artifact, ups, meta = generate(s, cfg)
    bounds = even_bounds(num_params(spec), s.shards)
    if cache:
        _write(path, spec, artifact, ups, meta)
    return RealUpdates(codec_name, cfg, spec, artifact, bounds, ups, meta,
                       time.perf_counter() - t0, False)  # fmt: skip


def generate(
    s: GenSettings, cfg: CodecConfig
) -> tuple[ModelSpecMsg, bytes, list[RealUpdate], dict[str, Any]]:
    """Train and encode ``s.updates`` updates (torch, one intra-op thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with Kafka: see sim.cnn1d.central_train
    try:
        return _generate(torch, s, cfg)
    finally:
        torch.set_num_threads(before)


def _generate(
    torch: Any, s: GenSettings, cfg: CodecConfig
) -> tuple[ModelSpecMsg, bytes, list[RealUpdate], dict[str, Any]]:
    from edge_agent.data import partition_dirichlet
    from schemas.artifact import normalize, spec_for
    from sim.cnn1d import accuracy, export_onnx, make_cnn
    from sim.mnist1d import load_mnist1d

    t0 = time.perf_counter()
    model = make_cnn(s.seed)
    info = normalize(export_onnx(model))
    spec = spec_for(info, torch_module=TORCH_MODULE)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if names != [(p.name, p.shape) for p in spec.params]:
        raise RuntimeError(f"module parameters {names} are not the spec's flat order")
    n = num_params(spec)
    bounds = even_bounds(n, s.shards)
    data = load_mnist1d()
    parts = partition_dirichlet(data.train.y, s.devices, s.dirichlet_alpha, seed=s.seed)
    xt, yt = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    to_vec, to_params = torch.nn.utils.parameters_to_vector, torch.nn.utils.vector_to_parameters
    rng = np.random.default_rng(s.seed)

    def train(base: F32, dev: int) -> tuple[F32, float]:
        to_params(torch.from_numpy(base.copy()), model.parameters())
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)  # fresh per task, as on devices
        model.train()
        total, seen = 0.0, 0
        for _ in range(s.local_epochs):
            order = rng.permutation(parts[dev])
            for a in range(0, len(order), s.batch_size):
                b = torch.from_numpy(order[a : a + s.batch_size])
                loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + float(loss.item()) * len(b), seen + len(b)
        return to_vec(model.parameters()).detach().numpy().astype(np.float32), total / seen

    glob = to_vec(model.parameters()).detach().numpy().astype(np.float32)
    residual: dict[int, F32] = {}
    flight = [(glob.copy(), 0, int(rng.integers(s.devices))) for _ in range(s.concurrency)]
    out: list[RealUpdate] = []
    losses: list[float] = []
    norms: list[float] = []
    for version in range(s.updates):
        base, base_v, dev = flight.pop(int(rng.integers(len(flight))))
        new, loss = train(base, dev)
        delta = new - base
        frames, res = codec.encode_update(delta, bounds, cfg, residual.get(dev))
        if cfg.error_feedback:
            residual[dev] = res
        a = s.alpha * (version - base_v + 1) ** -s.staleness_a
        glob = ((1 - a) * glob + a * (base + codec.decode_update(frames, bounds, n))).astype(
            np.float32
        )
        flight.append((glob.copy(), version + 1, int(rng.integers(s.devices))))
        out.append(RealUpdate(dev, len(parts[dev]), tuple(f for *_, f in frames)))
        losses.append(loss)
        norms.append(float(np.linalg.norm(delta)))
    to_params(torch.from_numpy(glob.copy()), model.parameters())
    meta = {
        "generate_s": round(time.perf_counter() - t0, 1),
        "train_loss_first_50": round(float(np.mean(losses[:50])), 4),
        "train_loss_last_50": round(float(np.mean(losses[-50:])), 4),
        "delta_l2_first_50": round(float(np.mean(norms[:50])), 4),
        "delta_l2_last_50": round(float(np.mean(norms[-50:])), 4),
        "final_test_accuracy": round(accuracy(model, data.test), 4),
    }
    return spec, info.data, out, meta


def _write(
    path: Path, spec: ModelSpecMsg, artifact: bytes, ups: list[RealUpdate], meta: dict[str, Any]
) -> None:
    flat = [f for u in ups for f in u.frames]
    offsets = np.cumsum([0, *(len(f) for f in flat)], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(
        buf,
        spec=np.frombuffer(msgspec.json.encode(spec), np.uint8),
        artifact=np.frombuffer(artifact, np.uint8),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        frames=np.frombuffer(b"".join(flat), np.uint8),
        offsets=offsets,
        devices=np.array([u.device for u in ups], np.int64),
        num_samples=np.array([u.num_samples for u in ups], np.int64),
    )
    atomic_write(path, buf.getvalue())


def _read(path: Path, name: str, cfg: CodecConfig) -> RealUpdates | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            spec = msgspec.json.decode(z["spec"].tobytes(), type=ModelSpecMsg)
            artifact, meta = z["artifact"].tobytes(), json.loads(z["meta"].tobytes())
            blob, off = z["frames"].tobytes(), z["offsets"]
            devices, samples = z["devices"], z["num_samples"]
    except (OSError, ValueError, KeyError, msgspec.DecodeError):
        return None  # unreadable: regenerate and replace
    k = (len(off) - 1) // max(1, len(devices))
    if k < 1 or k * len(devices) != len(off) - 1:
        return None
    ups = [
        RealUpdate(int(d), int(ns), tuple(blob[off[i * k + j] : off[i * k + j + 1]]
                                          for j in range(k)))
        for i, (d, ns) in enumerate(zip(devices, samples, strict=True))
    ]  # fmt: skip
    bounds = even_bounds(num_params(spec), k)
    return RealUpdates(name, cfg, spec, artifact, bounds, ups, meta, seconds=0.0, cached=True)
