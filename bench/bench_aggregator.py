"""Aggregator throughput: Kafka end to end vs the pure in-memory strategy, same updates.

Part 1 (per shard, in-process worker): for each announcement interval and strategy, a
stream of top-k int8 zstd updates of an ``--params``-parameter slice is produced to a fresh
one-partition topic; one ``AggregatorWorker`` consumes it. Records are stamped
``accepted_ts`` as if they arrived at ``--arrival-rate`` updates/s (the stream clock the
time-bounded cadence reads); base versions are announced versions <= 4 behind. Reported:
updates/s of the pure strategy on pre-decoded chunks (keeping the same announced versions
as bases), of the pure strategy fed the same compressed frames (codec decode + apply), of
the pure partition core on raw records (msgpack + checks + dedupe + decode + apply +
version events, serially), and of the worker from Kafka (first to last record, including
publishing and checkpoints), with the ratios worker / pure strategy (both variants), plus
the number of versions announced. Each rate is the median of ``--repeats`` runs (the
worker's runs each use a fresh topic).

Part 2 (scaling, separate processes): ``--scale-shards`` partitions, 1/2/4
``python -m aggregator`` processes in one consumer group. A few warm-up records per
partition are consumed first and the group must be ``Stable`` with every member before the
clock starts (so start-up, job load and rebalances are excluded); then the rest of the
stream is produced and the clock stops when every partition's offset is committed
(committed after the checkpoint that covers it, every 0.5 s). Median of ``--repeats``.

    .venv/bin/python bench/bench_aggregator.py --json
    FEDFLEET_BENCH_KAFKA=127.0.0.1:9092 .venv/bin/python bench/bench_aggregator.py --json
    ... --intervals 0,0.2 --arrival-rate 1000 --updates 1000   # old vs new cadence

Real updates (``--updates-from mnist1d``): Part 1 on ``--updates`` (400) real updates of the
MNIST-1D CNN (``sim.cnn1d``, 102,282 parameters), made by ``bench/cnn_updates.py``: trained
as the demo's devices train (Adam lr 2e-3, 3 local epochs, batch 16, Dirichlet(0.5) over
1,000 devices) along a FedAsync trajectory, encoded per device with error feedback
(``codec.encode_update``), once per ``--codecs`` name (``topk0.01-int8``, ``int8``,
``fp32``, ...) and cached under ``~/.cache/fedfleet/bench``. The job is the model's
``onnx`` spec cut into ``--model-shards`` (1: the whole vector per shard), shard 0 is
measured; bases, arrival clock and the four rates as above. Part 2 is skipped unless
``--scale-procs`` is given (it stays synthetic).

    .venv/bin/python bench/bench_aggregator.py --updates-from mnist1d --json
    ... --updates-from mnist1d --codecs topk0.01-int8 --model-shards 2   # the demo's split

Without FEDFLEET_BENCH_KAFKA a local stack is started with ``stack.LocalStack``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnn_updates import GenSettings, RealUpdates, load_updates  # noqa: E402

from aggregator.checkpoint import FileCheckpointStore  # noqa: E402
from aggregator.job_shard import Cadence  # noqa: E402
from aggregator.settings import AggregatorSettings  # noqa: E402
from aggregator.shard import PartitionState  # noqa: E402
from aggregator.strategies import StrategyOptions, Update, build_strategy  # noqa: E402
from aggregator.worker import AggregatorWorker  # noqa: E402
from schemas import codec  # noqa: E402
from schemas.artifact import initial_params  # noqa: E402
from schemas.messages import (  # noqa: E402
    CodecConfig,
    JobSpec,
    ModelSpecMsg,
    ShardUpdate,
    StrategyConfig,
    encode,
)
from schemas.modelspec import even_bounds, num_params  # noqa: E402

BIG = 64 << 20


def make_job(
    name: str, n_params: int, shards: int, publish_every: int, *, spec: ModelSpecMsg | None = None
) -> JobSpec:
    """A ``softmax`` job of about ``n_params`` parameters, or one of ``spec`` (cut with
    ``even_bounds`` into ``shards``, as the coordinator cuts)."""
    n_classes = 10
    spec = spec or ModelSpecMsg(
        family="softmax", n_features=max(1, n_params // n_classes - 1), n_classes=n_classes
    )
    # staleness in versions grows with the announcement interval (a base is up to
    # arrival_rate x interval versions old), so the bound is lifted for the benchmark
    cfg = StrategyConfig(
        name=name,  # type: ignore[arg-type]
        alpha=0.6,
        buffer_size=10,
        max_staleness=1_000_000,
    )
    return JobSpec(
        job_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
        model_name="bench",
        spec=spec,
        shard_bounds=even_bounds(num_params(spec), shards),
        strategy=cfg,
        publish_every=publish_every,
        created_ts=time.time(),
    )


def schedule(
    job: JobSpec, n: int, rng: np.random.Generator, *, rate: float, interval: float, t0: float
) -> list[tuple[float, int]]:
    """``(accepted_ts, base_version)`` of ``n`` updates arriving at ``rate``/s with realistic
    lags (base = an announced version <= 4 back under the cadence the worker will apply)."""
    buffered = job.strategy.name == "fedbuff"
    cad = Cadence(publish_every=job.publish_every, min_interval_s=interval)
    announced = [0]
    out: list[tuple[float, int]] = []
    for i in range(n):
        ts = t0 + i / rate
        cur = i // job.strategy.buffer_size if buffered else i
        lag = int(rng.integers(0, 5))
        out.append((ts, max(v for v in announced if v <= max(0, cur - lag))))
        cad.tick(ts)
        new = (i + 1) // job.strategy.buffer_size if buffered else i + 1
        if (not buffered or (i + 1) % job.strategy.buffer_size == 0) and cad.due(new):
            cad.announced(new)
            announced.append(new)
    return out


def shard_update(
    job: JobSpec, s: int, i: int, at: tuple[float, int], payload: bytes, *, device: str = "d",
    num_samples: int = 1,
) -> ShardUpdate:  # fmt: skip
    b = job.shard_bounds
    return ShardUpdate(update_id=f"u{s}-{i}", task_id=f"t{i}", job_id=job.job_id,
                       device_id=device, shard=s, start=b[s], stop=b[s + 1], base_version=at[1],
                       num_samples=num_samples, payload=payload, accepted_ts=at[0])  # fmt: skip


def make_updates(
    job: JobSpec, n: int, topk: float, *, rate: float, interval: float, seed: int = 0
) -> list[ShardUpdate]:
    """Per shard, ``n`` updates cycling through 8 random top-k int8 frames (``schedule``)."""
    rng = np.random.default_rng(seed)
    b = job.shard_bounds
    cfg = CodecConfig(topk=topk, quant="int8")
    out: list[ShardUpdate] = []
    t0 = time.time()
    for s in range(len(b) - 1):
        size = b[s + 1] - b[s]
        frames = [
            codec.encode(rng.normal(size=size).astype(np.float32) * 0.01, cfg) for _ in range(8)
        ]
        sched = schedule(job, n, rng, rate=rate, interval=interval, t0=t0)
        out += [shard_update(job, s, i, at, frames[i % 8]) for i, at in enumerate(sched)]
    return out


def real_updates(
    job: JobSpec, real: RealUpdates, *, rate: float, interval: float, seed: int = 0
) -> list[ShardUpdate]:
    """Shard 0 of the real updates in generation order, on the same ``schedule``."""
    rng = np.random.default_rng(seed)
    sched = schedule(job, len(real.updates), rng, rate=rate, interval=interval, t0=time.time())
    return [
        shard_update(job, 0, i, at, u.frames[0], device=f"d{u.device}", num_samples=u.num_samples)
        for i, (u, at) in enumerate(zip(real.updates, sched, strict=True))
    ]


def pure_strategy_rate(
    job: JobSpec,
    ups: list[ShardUpdate],
    interval: float,
    *,
    with_decode: bool = False,
    artifact: bytes | None = None,
) -> float:
    """Apply only (or codec decode + apply); exact FedAsync keeps the versions the cadence
    announces as bases."""
    s0 = [u for u in ups if u.shard == 0]
    pre = [] if with_decode else [codec.decode(u.payload, u.stop - u.start) for u in s0]
    init = initial_params(job.spec, job.init_seed, artifact)[s0[0].start : s0[0].stop]
    strat = build_strategy(job.strategy, init, options=StrategyOptions(keep_every=0))
    cad = Cadence(publish_every=job.publish_every, min_interval_s=interval)
    t0 = time.perf_counter()
    for i, u in enumerate(s0):
        c = codec.decode(u.payload, u.stop - u.start) if with_decode else pre[i]
        res = strat.apply(Update(c, u.base_version, u.num_samples, u.update_id))
        cad.tick(u.accepted_ts)
        if res.new_version is not None and cad.due(res.new_version):
            cad.announced(res.new_version)
            strat.mark_published()
    return len(s0) / (time.perf_counter() - t0)


def core_rate(
    job: JobSpec, ups: list[ShardUpdate], interval: float, artifact: bytes | None = None
) -> tuple[float, int]:
    raws = [encode(u) for u in ups if u.shard == 0]
    st = PartitionState(
        "bench", 0, min_publish_interval_s=interval, artifact_of=lambda _spec: artifact
    )
    built = 0
    t0 = time.perf_counter()
    for i, r in enumerate(raws):
        st.handle(r, i, {job.job_id: job}.get)
        for pv in st.outbox:
            pv.build()
        built += len(st.outbox)
        st.outbox.clear()
    if interval > 0 and st.announce_latest():  # the idle announcement at the end
        st.release_held()
        for pv in st.outbox:
            pv.build()
        built += len(st.outbox)
    return len(raws) / (time.perf_counter() - t0), built


async def create_topics(bootstrap: str, prefix: str, parts: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        big = {"max.message.bytes": str(BIG)}
        await admin.create_topics(
            [
                NewTopic(f"{prefix}jobs", 1, 1, topic_configs={"cleanup.policy": "compact"}),
                NewTopic(f"{prefix}updates", parts, 1, topic_configs=big),
                NewTopic(f"{prefix}models", 1, 1, topic_configs=big),
            ]
        )
    finally:
        await admin.close()


async def produce(bootstrap: str, prefix: str, job: JobSpec, ups: list[ShardUpdate]) -> None:
    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=BIG,
        linger_ms=5,
    )
    await p.start()
    try:
        await p.send_and_wait(f"{prefix}jobs", encode(job), key=job.job_id.encode())
        futs = [await p.send(f"{prefix}updates", encode(u), partition=u.shard) for u in ups]
        for f in futs:
            await f
    finally:
        await p.stop()


async def kafka_rate(
    bootstrap: str,
    job: JobSpec,
    ups: list[ShardUpdate],
    interval: float,
    artifact: bytes | None = None,
) -> tuple[float, int, float]:
    prefix = f"b{uuid.uuid4().hex[:8]}."
    await create_topics(bootstrap, prefix, 1)
    await produce(bootstrap, prefix, job, ups)
    settings = AggregatorSettings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        group_id=f"{prefix}g",
        poll_timeout_ms=100,
        min_publish_interval_s=interval,
    )
    ckdir = tempfile.mkdtemp(prefix="bench-agg-")
    worker = AggregatorWorker(settings, store=FileCheckpointStore(ckdir))
    if artifact is not None:  # what the coordinator writes to {prefix}artifacts; read at start
        worker.artifacts.put(artifact, job.spec.artifact)
    times: list[float] = []  # when the last record of each fetched batch was applied
    handled: list[int] = []
    orig = worker._apply_records

    async def timed(part: Any, records: list[Any]) -> int:
        n = await orig(part, records)
        times.append(time.perf_counter())
        handled.append(n)
        return n

    worker._apply_records = timed  # type: ignore[method-assign]
    async with worker:
        t_first: list[float] = []
        orig_assigned = worker._on_assigned

        async def on_assigned(tps: Any) -> None:
            await orig_assigned(tps)
            t_first.append(time.perf_counter())

        worker._on_assigned = on_assigned  # type: ignore[method-assign]
        await worker.drain(idle_s=0.3)
    shutil.rmtree(ckdir, ignore_errors=True)
    published = int(worker.metrics.value("fedfleet_aggregator_versions_published_total"))
    ckpt_s = worker.metrics.value("fedfleet_aggregator_checkpoint_seconds_sum")
    return sum(handled) / (times[-1] - t_first[0]), published, ckpt_s


async def committed(bootstrap: str, group: str, topic: str, parts: int) -> list[int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return [(await c.committed(TopicPartition(topic, p))) or 0 for p in range(parts)]
    finally:
        await c.stop()


async def wait_committed(bootstrap: str, group: str, topic: str, target: list[int]) -> None:
    for _ in range(3000):
        if await committed(bootstrap, group, topic, len(target)) == target:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{group} never committed {target}")


async def group_state(bootstrap: str, group: str) -> tuple[str, int]:
    """(state, member count) of a consumer group, from DescribeGroups."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    desc = resp[0].to_object()["groups"][0]
    return str(desc["state"]), len(desc["members"])


async def scaling_run(
    bootstrap: str,
    job: JobSpec,
    ups: list[ShardUpdate],
    procs: int,
    interval: float,
    warm: int = 5,
) -> float:
    """Seconds to apply ``ups`` (minus the warm-up) with ``procs`` processes in one group.

    The first ``warm`` updates of every partition are produced before the processes start;
    once they are committed and the group is ``Stable`` with all ``procs`` members (so
    start-up, job load and rebalancing are over), the clock starts, the rest of the stream
    is produced and the clock stops when every partition's offset is committed.
    """
    parts = len(job.shard_bounds) - 1
    prefix = f"s{uuid.uuid4().hex[:8]}."
    group = f"{prefix}g"
    await create_topics(bootstrap, prefix, parts)
    seen: dict[int, int] = {}
    first: list[ShardUpdate] = []
    rest: list[ShardUpdate] = []
    for u in ups:
        seen[u.shard] = seen.get(u.shard, 0) + 1
        (first if seen[u.shard] <= warm else rest).append(u)
    await produce(bootstrap, prefix, job, first)
    per_part = len(ups) // parts
    with tempfile.TemporaryDirectory() as ckdir:
        env = dict(
            os.environ,
            FEDFLEET_AGG_CHECKPOINT_INTERVAL_S="0.5",
            FEDFLEET_AGG_SESSION_TIMEOUT_MS="6000",
            FEDFLEET_AGG_HEARTBEAT_INTERVAL_MS="1000",
            FEDFLEET_AGG_MIN_PUBLISH_INTERVAL_S=str(interval),
        )
        args = [
            "-m",
            "aggregator",
            "--kafka-bootstrap",
            bootstrap,
            "--topic-prefix",
            prefix,
            "--group-id",
            group,
            "--checkpoint-dir",
            ckdir,
            "--log-level",
            "WARNING",
        ]
        ps = [
            await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, env=env)
            for _ in range(procs)
        ]
        try:
            await wait_committed(bootstrap, group, f"{prefix}updates", [warm] * parts)
            for _ in range(600):
                if await group_state(bootstrap, group) == ("Stable", procs):
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(f"{group} never became Stable with {procs} members")
            t0 = time.perf_counter()
            await produce(bootstrap, prefix, job, rest)
            await wait_committed(bootstrap, group, f"{prefix}updates", [per_part] * parts)
            elapsed = time.perf_counter() - t0
        finally:
            for p in ps:
                p.send_signal(signal.SIGTERM)
            for p in ps:
                await asyncio.wait_for(p.wait(), 60)
    return elapsed


Workload = Callable[[str, float], tuple[JobSpec, list[ShardUpdate]]]


async def part1(
    a: argparse.Namespace, bootstrap: str, workload: Workload, *, artifact: bytes | None = None,
    label: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Per interval and strategy: the four rates (medians of ``a.repeats`` runs), ratios."""
    out: dict[str, Any] = {}
    for interval in [float(x) for x in a.intervals.split(",")]:
        per: dict[str, Any] = {}
        out[f"min_publish_interval_s={interval:g}"] = per
        for name in a.strategies.split(","):
            job, ups = workload(name, interval)
            runs: dict[str, list[float]] = {"pure": [], "pure_dec": [], "core": [], "kafka": []}
            for _ in range(a.repeats):
                runs["pure"].append(pure_strategy_rate(job, ups, interval, artifact=artifact))
                runs["pure_dec"].append(
                    pure_strategy_rate(job, ups, interval, with_decode=True, artifact=artifact)
                )
                core, core_pub = core_rate(job, ups, interval, artifact)
                runs["core"].append(core)
                kafka, published, ckpt_s = await kafka_rate(bootstrap, job, ups, interval, artifact)
                runs["kafka"].append(kafka)
            pure, pure_dec, core, kafka = (
                statistics.median(runs[k]) for k in ("pure", "pure_dec", "core", "kafka")
            )
            per[name] = {
                "pure_strategy_ups": round(pure, 1),
                "pure_strategy_with_decode_ups": round(pure_dec, 1),
                "pure_core_ups": round(core, 1),
                "kafka_worker_ups": round(kafka, 1),
                "ratio_vs_strategy": round(kafka / pure, 3),
                "ratio_vs_strategy_with_decode": round(kafka / pure_dec, 3),
                "ratio_vs_core": round(kafka / core, 3),
                "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                "versions_announced": published,
                "core_versions_announced": core_pub,
                "worker_checkpoint_s": round(ckpt_s, 3),  # incl. the final ones after drain
            }
            print(label, interval, name, per[name], file=sys.stderr)
    return out


async def part1_mnist1d(a: argparse.Namespace, bootstrap: str, gen: GenSettings) -> dict[str, Any]:
    """Part 1 on the CNN's real updates (``bench/cnn_updates.py``), per codec."""
    out: dict[str, Any] = {}
    for cname in a.codecs.split(","):
        real = load_updates(gen, cname)
        print(cname, real.stats(), file=sys.stderr)

        def workload(
            name: str, interval: float, real: RealUpdates = real
        ) -> tuple[JobSpec, list[ShardUpdate]]:
            job = make_job(name, 0, gen.shards, a.publish_every, spec=real.spec)
            return job, real_updates(job, real, rate=a.arrival_rate, interval=interval)

        out[cname] = {
            "params_per_shard": real.bounds[1] - real.bounds[0],
            "generated": real.stats(),
            "per_shard": await part1(a, bootstrap, workload, artifact=real.artifact, label=cname),
        }
    return out


async def main_async(a: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "updates_from": a.updates_from,
        "params_per_shard": a.params,
        "updates": a.updates,
        "topk": a.topk,
        "publish_every": a.publish_every,
        "arrival_rate": a.arrival_rate,
        "per_shard": {},
        "scaling": {},
    }
    if a.updates_from == "mnist1d":
        for k in ("params_per_shard", "topk", "per_shard"):  # per codec instead
            del res[k]
        gen = GenSettings(updates=a.updates, shards=a.model_shards, devices=a.devices,
                          seed=a.gen_seed)  # fmt: skip
        res["generation"] = asdict(gen)
        res["per_codec"] = await part1_mnist1d(a, bootstrap, gen)
    else:

        def synthetic(name: str, interval: float) -> tuple[JobSpec, list[ShardUpdate]]:
            job = make_job(name, a.params, 1, a.publish_every)
            return job, make_updates(job, a.updates, a.topk, rate=a.arrival_rate, interval=interval)

        res["per_shard"] = await part1(a, bootstrap, synthetic)
    if a.scale_procs:
        shards = a.scale_shards
        interval = float(a.intervals.split(",")[-1])
        res["scaling_min_publish_interval_s"] = interval
        job = make_job(a.scale_strategy, a.params * shards, shards, a.publish_every)
        ups = make_updates(job, a.scale_updates, a.topk, rate=a.arrival_rate, interval=interval)
        for procs in [int(x) for x in a.scale_procs.split(",")]:
            walls = [
                await scaling_run(bootstrap, job, ups, procs, interval) for _ in range(a.repeats)
            ]
            wall = statistics.median(walls)
            res["scaling"][str(procs)] = {
                "wall_s": round(wall, 2),
                "walls_s": [round(w, 2) for w in walls],
                "total_ups": round((len(ups) - 5 * shards) / wall, 1),
            }
            print(procs, res["scaling"][str(procs)], file=sys.stderr)
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=int, default=1_000_000, help="parameters per shard")
    p.add_argument("--updates-from", choices=("synthetic", "mnist1d"), default="synthetic")
    p.add_argument(
        "--updates", type=int, default=None, help="updates per shard (1000; mnist1d: 400)"
    )
    p.add_argument("--topk", type=float, default=0.01)
    p.add_argument("--publish-every", type=int, default=5)
    p.add_argument(
        "--intervals", default="0,0.2", help="min_publish_interval_s values (0 = old cadence)"
    )
    p.add_argument(
        "--arrival-rate", type=float, default=1000.0, help="updates/s per shard (accepted_ts)"
    )
    p.add_argument("--strategies", default="fedasync,fedasync_delta,fedbuff")
    p.add_argument(
        "--codecs", default="topk0.01-int8,int8,fp32", help="mnist1d: codec names"
    )
    p.add_argument("--model-shards", type=int, default=1, help="mnist1d: shards of the model")
    p.add_argument("--devices", type=int, default=1000, help="mnist1d: fleet size")
    p.add_argument("--gen-seed", type=int, default=0, help="mnist1d: generation seed")
    p.add_argument("--scale-procs", default=None, help="1,2,4 ('' = none; mnist1d: none)")
    p.add_argument("--scale-shards", type=int, default=4)
    p.add_argument("--scale-updates", type=int, default=1000, help="updates per shard")
    p.add_argument("--scale-strategy", default="fedasync")
    p.add_argument("--repeats", type=int, default=3, help="runs per rate (median)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    mnist = a.updates_from == "mnist1d"
    a.updates = a.updates or (400 if mnist else 1000)
    a.scale_procs = ("" if mnist else "1,2,4") if a.scale_procs is None else a.scale_procs
    bootstrap = os.environ.get("FEDFLEET_BENCH_KAFKA")
    launcher = None
    if not bootstrap:
        from stack import LocalStack, StackSettings

        launcher = LocalStack(StackSettings.from_env())
        bootstrap = launcher.start().kafka_bootstrap
    try:
        res = asyncio.run(main_async(a, bootstrap))
    finally:
        if launcher is not None:
            launcher.stop()
    res["machine"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(k, v)


if __name__ == "__main__":
    main()
