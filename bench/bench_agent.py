"""Benchmark of the edge agent: memory, CPU per telemetry tick, local training throughput.

* Resident memory (RSS) of one idle connected agent, and of N (default 1,000) simulated
  agents in one process (private Mosquitto on loopback, ``MemoryOutbox``, shared
  ``httpx.AsyncClient``, ``inference=False``), reported per agent.
* CPU (user+sys of this process) per telemetry tick while the N agents are idle and each
  publishes telemetry every ``--interval`` seconds (broker CPU not included).
* Local training throughput (samples/s) of ``NumpyTrainer`` and of the agent's training
  path (``execution.train_and_encode``: gate checks, event-loop yields, codec) as a ratio to a
  bare numpy SGD loop over the same data, measured in the same run.

    .venv/bin/python bench/bench_agent.py [--quick] [--agents N] [--window S] [--json]

Numbers are written down in BENCHMARKS.md ("## Edge agent"), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from edge_agent.agent import EdgeAgent
from edge_agent.data import load_digits_split, partition_dirichlet
from edge_agent.execution import train_and_encode
from edge_agent.models import VerifiedModel
from edge_agent.probe import ProbeReading, SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.trainers import NumpyTrainer
from schemas.messages import CodecConfig, ModelManifest, ModelSpecMsg, Task, TrainConfig
from schemas.modelspec import init_params, num_params


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto() -> Any:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for _ in range(250):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


# --------------------------------------------------------------------------- fleet memory/CPU


async def fleet_bench(n: int, window: float, interval: float) -> dict[str, Any]:
    train, _ = load_digits_split()
    parts = partition_dirichlet(train.y, n, 0.5, seed=0)
    out: dict[str, Any] = {"agents": n, "telemetry_interval_s": interval}
    with mosquitto() as port:
        http = httpx.AsyncClient()

        def make(i: int) -> EdgeAgent:
            s = AgentSettings(
                device_id=f"bench-{i:05d}",
                mqtt_port=port,
                api_url="http://127.0.0.1:9",
                public_key_hex="00" * 32,
                telemetry_interval_s=interval,
                inference=False,
                resend_interval_s=3600.0,
            )
            return EdgeAgent(s, SimulatedProbe(seed=i), train.subset(parts[i % n]), http=http)

        warm = make(n + 1)  # load lazily imported modules before the baseline
        async with warm:
            await warm.wait_connected(30)
        gc.collect()
        base = rss_mb()
        one = make(n + 2)
        async with one:
            await one.wait_connected(30)
            await asyncio.sleep(0.5)
            gc.collect()
            out["rss_one_idle_agent_mb"] = round(rss_mb() - base, 3)  # delta; noise-level
            out["rss_process_with_one_agent_mb"] = round(rss_mb(), 1)
        gc.collect()
        base = rss_mb()
        agents = [make(i) for i in range(n)]
        t0 = time.monotonic()
        for a in agents:
            await a.start()
            await asyncio.sleep(0.002)  # ~500 connects/s, no self-made connect storm
        await asyncio.gather(*(a.wait_connected(120) for a in agents))
        out["connect_all_s"] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(2 * interval)
        gc.collect()
        rss_n = rss_mb() - base
        out["rss_fleet_mb"] = round(rss_n, 1)
        out["rss_per_agent_kb"] = round(rss_n * 1024 / n, 1)
        ticks0 = sum(a.stats.telemetry_sent for a in agents)
        prof = None
        if os.environ.get("BENCH_PROFILE"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        c0, w0 = cpu_s(), time.monotonic()
        await asyncio.sleep(window)
        c1, w1 = cpu_s(), time.monotonic()
        if prof is not None:
            import pstats

            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
        ticks = sum(a.stats.telemetry_sent for a in agents) - ticks0
        out["telemetry_ticks"] = ticks
        out["cpu_per_tick_us"] = round((c1 - c0) / max(1, ticks) * 1e6, 1)
        out["cpu_share_of_core"] = round((c1 - c0) / (w1 - w0), 3)
        await asyncio.gather(*(a.stop() for a in agents))
        await http.aclose()
    return out


# --------------------------------------------------------------------------- training


def bare_softmax_sgd(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    lr: float,
    bs: int,
    epochs: int,
    rng: np.random.Generator,
) -> None:
    n = x.shape[0]
    onehot = np.eye(w.shape[1], dtype=np.float32)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            xb = x[idx]
            z = xb @ w + b
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            d = (p - onehot[y[idx]]) / len(idx)
            w -= lr * (xb.T @ d)
            b -= lr * d.sum(axis=0)


def _median(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def training_bench(repeats: int) -> dict[str, Any]:
    train, _ = load_digits_split()
    spec = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)
    cfg = TrainConfig(lr=0.5, local_epochs=5, batch_size=32)
    samples = len(train) * cfg.local_epochs
    base = init_params(spec)

    def bare() -> None:
        w = np.zeros((64, 10), np.float32)
        b = np.zeros(10, np.float32)
        bare_softmax_sgd(
            train.x,
            train.y,
            w,
            b,
            cfg.lr,
            cfg.batch_size,
            cfg.local_epochs,
            np.random.default_rng(0),
        )

    def trainer() -> None:
        run = NumpyTrainer().start(spec, base, train.x, train.y, cfg)
        while not run.step(64):
            pass

    manifest = ModelManifest(
        model_name="m",
        job_id="j",
        version=0,
        shard_versions=[0, 0],
        shard_bounds=[0, 300, num_params(spec)],
        spec=spec,
        digest="0",
        created_ts=1.0,
    )
    model = VerifiedModel(manifest, base)
    settings = AgentSettings(device_id="b")  # no pacer below: no simulated compute time
    probe = SimulatedProbe(seed=0, battery=90, charging=True, network="wifi")
    now = time.time()
    task = Task(
        task_id="t",
        job_id="j",
        device_id="b",
        model_name="m",
        upload_token="x",
        issued_ts=now,
        deadline_ts=now + 1e6,
        train=cfg,
        codec=CodecConfig(topk=0.1, quant="int8"),
    )

    async def agent_path_async() -> float:
        async def once() -> None:
            await train_and_encode(
                task,
                model,
                ProbeReading(),
                trainer=NumpyTrainer(),
                dataset=train,
                probe=probe,
                settings=settings,
                residual=None,
            )

        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            await once()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_bare = _median(bare, repeats)
    t_tr = _median(trainer, repeats)
    t_ag = asyncio.run(agent_path_async())
    return {
        "dataset": f"digits train {len(train)} x 64, softmax, bs 32, 5 epochs",
        "bare_numpy_samples_per_s": round(samples / t_bare),
        "numpy_trainer_samples_per_s": round(samples / t_tr),
        "agent_path_samples_per_s": round(samples / t_ag),
        "trainer_vs_bare": round(t_bare / t_tr, 3),
        "agent_path_vs_bare": round(t_bare / t_ag, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 agents, 5 s window")
    ap.add_argument("--agents", type=int)
    ap.add_argument("--window", type=float)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.agents or (200 if args.quick else 1000)
    window = args.window or (5.0 if args.quick else 15.0)
    result: dict[str, Any] = {
        "bench": "edge_agent",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "training": training_bench(args.repeats),
    }
    result["fleet"] = asyncio.run(fleet_bench(n, window, args.interval))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
