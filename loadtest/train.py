"""``train``: one fleet, one dataset, FedAsync vs FedBuff vs synchronous FedAvg.

The strategies run one after the other on the same connected fleet (same devices, same
non-IID split, same speeds), each as its own job with its own model name, until the
target accuracy holds for ``stable_versions`` new versions or the per-strategy budget
runs out. Device compute time dominates the pipeline (``time_scale`` and
``base_samples_per_s`` make a median device take seconds, the lognormal tail tens of
seconds), so synchronous rounds wait on stragglers as they do in real fleets.

``task`` picks the learning task (``sim.tasks``: ``digits``, or ``mnist1d``, the 1D CNN
brought as the user's own ONNX model) and ``codecs`` the update encodings: every
(strategy, codec) pair is one job, so ``--strategies fedasync --codecs fp32,topk0.01-int8``
compares dense fp32 uploads with top-1% int8 (error feedback on) on the same fleet, and the
summary gives each run's uplink bytes per update and its ratio to the fp32 run's. With
``max_updates`` a run ends after that many accepted updates instead of at the target, so
codecs are compared at the same update budget; every run's final accuracy is that of the
drained model (every acknowledged update applied).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from loadtest.runner import Env, Progress, Timeline
from schemas.messages import ModelSpecMsg
from schemas.modelspec import num_params
from sim.enrol import enrol_if_secure
from sim.fleet import FleetSpec
from sim.load_services import wait_quiet
from sim.monitor import ModelMonitor, fed_text
from sim.pool import FleetPool
from sim.services import AggMetrics, scrape
from sim.tasks import LEARNING, Task, codec_of, load_task
from stack.errors import StackError


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    devices: int = 300
    strategies: tuple[str, ...] = ("fedasync", "fedbuff", "fedavg")
    target_accuracy: float = 0.85
    budget_s: float = 150.0  # per strategy
    concurrency: int = 30
    time_scale: float = 1.0
    task_s: float = 2.0  # median device's compute time per task (real seconds)
    speed_sigma: float = 1.0
    over_selection: float = 1.3
    round_deadline_s: float = 60.0
    fedbuff_k: int = 10
    lr: float = 0.5
    local_epochs: int = 5
    batch_size: int = 8
    processes: int = 1
    stable_versions: int = 3
    seed: int = 0
    task: str = "digits"  # sim.tasks
    codecs: tuple[str, ...] = ("int8",)  # see codec_of
    max_updates: int = 0  # >0: a run ends after this many accepted updates, not at target
    publish_every: int = 1
    # a share of the fleet uploads forged models (sim.byzantine; the digits task only)
    byzantine: float = 0.0
    attack: str = "sign_flip"
    # the update-norm bound per run: "on" the jobs' default (adaptive clipping), "off"
    # clip_multiplier 0; both: every strategy x codec runs with and without it
    bounds: tuple[str, ...] = ("on",)
    optimizer: str = ""  # "" = the task's (sim.tasks); sgd | momentum | adam
    momentum: float = 0.9  # for optimizer "momentum"


BOUNDS = ("on", "off")

# TrainSettings fields a task sets when the user does not (sim.tasks.LEARNING)
TASK_FIELDS = ("devices", "concurrency", "lr", "local_epochs", "batch_size",
               "target_accuracy", "publish_every", "stable_versions")  # fmt: skip


def task_defaults(task: str) -> dict[str, Any]:
    return {k: v for k, v in LEARNING.get(task, {}).items() if k in TASK_FIELDS}


def run_label(strategy: str, codec: str, s: TrainSettings, bound: str = "on") -> str:
    label = strategy if len(s.codecs) == 1 else f"{strategy}+{codec}"
    return label if len(s.bounds) == 1 else f"{label}+{'clip' if bound == 'on' else 'noclip'}"


def fed_round(acc: float | None) -> float | None:
    return None if acc is None else round(acc, 4)


def job_body(s: TrainSettings, strategy: str, run_id: str, *, task: Task | None = None,
             spec: dict[str, Any] | None = None, codec: str = "int8", bound: str = "on",
             ) -> dict[str, Any]:  # fmt: skip
    """One run's job: ``spec`` the model's (default the digits softmax), ``task`` gives the
    model name and the task's training extras (e.g. the optimizer)."""
    strat: dict[str, Any] = {"name": strategy}
    selection: dict[str, Any] = {"mode": "async"}
    train = {"lr": s.lr, "local_epochs": s.local_epochs, "batch_size": s.batch_size,
             **(task.train_extra if task else {})}  # fmt: skip
    if s.optimizer:  # the run's optimizer over the task's
        train.update(optimizer=s.optimizer, momentum=s.momentum)
    if strategy in ("fedasync", "fedasync_delta"):
        strat.update(alpha=0.6, staleness="polynomial", staleness_a=0.5, max_staleness=200)
    elif strategy == "fedbuff":
        strat.update(buffer_size=s.fedbuff_k, server_lr=1.0, max_staleness=200)
    elif strategy == "fedavg":
        strat.update(buffer_size=s.concurrency, server_lr=1.0)
        selection = {"mode": "sync", "over_selection": s.over_selection,
                     "round_deadline_s": s.round_deadline_s}  # fmt: skip
    if bound == "off":  # no update-norm bound (the jobs' default is adaptive clipping)
        strat["clip_multiplier"] = 0.0
    name = (task.model_name if task else "digits") + f"-{strategy}"
    tag = strategy if len(s.codecs) == 1 else f"{strategy}-{codec.replace('.', '')}"
    if len(s.bounds) > 1:
        tag += "-clip" if bound == "on" else "-noclip"
    return {
        "model_name": f"{name}-{tag}-{run_id}" if tag != strategy else f"{name}-{run_id}",
        "job_id": f"{tag}-{run_id}",
        "spec": spec or {"family": "softmax", "n_features": 64, "n_classes": 10},
        "shards": 2,
        "strategy": strat,
        "train": train,
        "codec": codec_of(codec),
        "concurrency": s.concurrency,
        "target_accuracy": s.target_accuracy,
        "init_seed": s.seed,
        "publish_every": s.publish_every,
        "eligibility": {"min_battery": 10, "allow_metered": True},
        "selection": selection,
    }


@dataclass(frozen=True)
class Run:
    """One job of the comparison: a strategy with a codec, on the task's model."""

    strategy: str
    codec: str
    label: str
    task: Task
    spec: dict[str, Any] | None  # the uploaded artifact's spec (None: the task's built-in)
    bound: str = "on"  # the update-norm bound (BOUNDS)


async def _one(
    env: Env, s: TrainSettings, run: Run, pool: FleetPool,
    timeline: Timeline, bar: Progress, done_before: float,
) -> dict[str, Any]:  # fmt: skip
    strategy = run.strategy
    spec = run.spec or run.task.spec
    body = job_body(s, strategy, env.run_id, task=run.task, spec=spec, codec=run.codec,
                    bound=run.bound)  # fmt: skip
    ports = env.services.metrics_ports
    m0 = await scrape(env.http, ports)
    st0 = pool.snapshot()["stats"]
    job = await env.api.create_job(body)
    job_id = job["job_id"]
    monitor = ModelMonitor(env.http, body["model_name"], job_id, run.task.test)
    t0 = time.monotonic()
    curve: list[tuple[float, float]] = []
    fed_curve: list[tuple[float, float]] = []  # federated evaluations, as they close
    first: float | None = None  # first version at/above target
    ttt: float | None = None  # target held for ``stable_versions`` versions in a row
    streak = 0
    while True:
        env.services.check_alive()
        prev, prev_fed = monitor.snap.version, monitor.snap.fed_version
        snap = await monitor.poll()
        el = time.monotonic() - t0
        m = await scrape(env.http, ports)
        counts = snap.fleet.get("counts", {})
        timeline.add(strategy=run.label, accuracy=snap.accuracy, version=snap.version,
                     fed_accuracy=snap.fed_accuracy, fed_version=snap.fed_version,
                     applied=m.applied - m0.applied, offline=counts.get("offline", 0),
                     idle=counts.get("idle", 0), training=counts.get("training", 0),
                     connected=pool.snapshot()["connected"])  # fmt: skip
        if snap.fed_accuracy is not None and snap.fed_version != prev_fed:
            fed_curve.append((round(el, 2), round(snap.fed_accuracy, 4)))
        if snap.version != prev:
            curve.append((round(el, 2), round(snap.accuracy, 4)))
            if snap.accuracy >= s.target_accuracy:
                streak += 1
                first = round(el, 2) if first is None else first
                if streak >= s.stable_versions and ttt is None:
                    ttt = round(el, 2)
            else:
                streak = 0
        bar.update(done_before + el, f"{run.label}: acc={snap.accuracy:.3f} {fed_text(snap)} "
                   f"v{snap.version} accepted={snap.updates_accepted} "
                   f"applied={m.applied - m0.applied:.0f}", run.label)  # fmt: skip
        if s.max_updates > 0:
            if snap.updates_accepted >= s.max_updates:
                break
        elif streak >= s.stable_versions:
            break
        if el >= s.budget_s:
            break
        await asyncio.sleep(0.5)
    wall = time.monotonic() - t0
    await env.api.stop_job(job_id)
    # every acknowledged upload lands (exactly once) before the final figure is read
    final = await monitor.drain(quiet_s=3.0, timeout_s=60.0)
    m1 = await wait_quiet(env.http, ports, quiet_s=3.0, timeout_s=30.0)
    view = await env.api.get(f"/v1/jobs/{job_id}")
    d: AggMetrics = m1.minus(m0)
    # Let devices still training for this job finish or give up before the next job.
    t_idle = time.monotonic()
    while pool.snapshot()["busy"] > 0 and time.monotonic() - t_idle < 30.0:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    stats = view.get("stats", {})
    rounds: dict[str, Any] = {}
    if strategy == "fedavg":
        redis = redis_client(env.info.redis_url)
        try:
            h = await redis.hgetall(Keys(env.services.redis_prefix).round(job_id))
        finally:
            await redis.aclose()
        n = int(h.get("round", 0))
        useful = max(monitor.snap.shard_versions or [0])
        rounds = {"rounds_started": n, "rounds_that_moved_the_model": useful,
                  "rounds_wasted": max(0, n - useful)}  # fmt: skip
    st1 = pool.snapshot()["stats"]
    accepted = int(view.get("updates_accepted", 0))
    update_bytes = int(st1.get("update_bytes", 0) - st0.get("update_bytes", 0))
    sent = int(st1.get("updates_sent", 0) - st0.get("updates_sent", 0))
    return {
        "sync_rounds": rounds,
        "strategy": strategy,
        "label": run.label,
        "codec": run.codec,
        "bound": run.bound,
        "codec_config": body["codec"],
        "num_params": num_params(msgspec.convert(spec, ModelSpecMsg)),
        "job_id": job_id,
        "time_to_target_s": ttt,
        "first_at_target_s": first,
        "target_reached": ttt is not None,
        # the drained model: every acknowledged update applied on every shard
        "final_accuracy": round(final.accuracy, 4),
        "final_version": final.version,
        # the latest federated evaluation (None: none yet, or the coordinator serves none)
        "final_fed_accuracy": fed_round(monitor.snap.fed_accuracy),
        "fed_version": monitor.snap.fed_version,
        "wall_s": round(wall, 1),
        "model_version": monitor.snap.version,
        "updates_accepted": accepted,
        "updates_applied_shard_max": int(view.get("updates_applied", 0)),
        "aggregator_chunks_applied": int(d.applied),
        "aggregator_rejected": {k: int(v) for k, v in d.rejected.items() if v},
        "mean_staleness": round(float(view.get("mean_staleness", 0.0)), 3),
        "staleness_hist": d.staleness_hist(),
        # update frames sent over MQTT or HTTP, re-sends included
        "update_bytes": update_bytes,
        "updates_sent": sent,
        "bytes_per_update": round(update_bytes / sent, 1) if sent else None,
        "mqtt_bytes_all": int(st1.get("bytes_sent", 0) - st0.get("bytes_sent", 0)),
        "tasks": {k: v for k, v in stats.items() if k.startswith("tasks_")},
        "late_updates": int(stats.get("late_updates", 0)),
        "curve": curve,
        "fed_curve": fed_curve,
    }


async def run_train(env: Env, s: TrainSettings, *, quiet: bool) -> dict[str, Any]:
    task = load_task(s.task, s.seed)
    for c in s.codecs:
        codec_of(c)  # a bad name fails before the fleet starts
    if any(b not in BOUNDS for b in s.bounds):
        raise StackError(f"--bounds takes {' and/or '.join(BOUNDS)}, got {','.join(s.bounds)}")
    if s.byzantine and s.task != "digits":
        raise StackError("--byzantine needs a built-in model (--task digits): an onnx job "
                         "trains with its artifact's own trainer")  # fmt: skip
    model_spec = await env.api.model_spec(task)
    key = await env.api.public_key()
    # A speed-1 device with the mean partition takes ``task_s`` of real time per task.
    mean_samples = len(task.train) / s.devices * s.local_epochs
    bsps = mean_samples / (s.task_s * s.time_scale)
    spec = FleetSpec(
        devices=s.devices, seed=s.seed, time_scale=s.time_scale,
        base_samples_per_s=bsps, speed_sigma=s.speed_sigma,
        telemetry_interval_s=2.0, id_prefix=f"tr{env.run_id}", connect_per_s=500.0,
        task=s.task, byzantine_share=s.byzantine, attack=s.attack,
    )  # fmt: skip
    enrolled = await enrol_if_secure(env.http, env.services, spec.device_ids())
    if enrolled.credentials is not None:  # a secure stack: every device enrolled first
        print(f"[train] enrolled {len(enrolled.credentials)} devices in "
              f"{enrolled.seconds:.1f}s", file=sys.stderr)  # fmt: skip
    pool = FleetPool(spec, processes=s.processes, mqtt_host=env.info.mqtt_host,
                     mqtt_port=env.info.mqtt_port, api_url=env.services.rest_url,
                     public_key_hex=key, log_dir=env.workdir,
                     credentials=enrolled.credentials, ca_file=enrolled.ca_file)  # fmt: skip
    runs = [Run(st, c, run_label(st, c, s, b), task, model_spec, b)
            for st in s.strategies for c in s.codecs for b in s.bounds]  # fmt: skip
    timeline = Timeline()
    results: list[dict[str, Any]] = []
    async with pool:
        t_conn = time.monotonic()
        while pool.snapshot()["connected"] < s.devices and time.monotonic() - t_conn < 60:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0 * spec.telemetry_interval_s)  # telemetry reaches the coordinator
        with Progress("train", s.budget_s * len(runs), quiet=quiet) as bar:
            for i, run in enumerate(runs):
                results.append(await _one(env, s, run, pool, timeline, bar, i * s.budget_s))
    by = {r["strategy"]: r for r in results}
    sync = by.get("fedavg", {}).get("time_to_target_s")
    best_async = min((r["time_to_target_s"] for r in results if r["strategy"] != "fedavg"
                      and r["time_to_target_s"] is not None), default=None)  # fmt: skip
    speedup: float | None = None
    if best_async and sync:
        speedup = round(sync / best_async, 2)
    elif best_async and "fedavg" in by:  # sync never reached the target: a lower bound
        speedup = round(by["fedavg"]["wall_s"] / best_async, 2)
    return {
        "scenario": "train",
        "settings": {k: v for k, v in s.__dict__.items()},
        "strategies": results,
        "codecs": codec_comparison(results),
        "speedup_async_vs_sync": speedup,
        "speedup_is_lower_bound": bool(best_async and not sync and "fedavg" in by),
        "target": {"speedup": 3.0, "met": speedup is not None and speedup >= 3.0},
        "fleet_stats": pool.snapshot()["stats"],
        "timeline": timeline.rows,
    }


def codec_comparison(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: uplink bytes per update against fp32 dense (4 bytes a parameter, and the
    fp32 run of the same strategy when there is one), and its final accuracy against that
    run's (points)."""
    dense = {(r["strategy"], r["bound"]): r for r in results if r["codec"] == "fp32"}
    out: list[dict[str, Any]] = []
    for r in results:
        bpu = r["bytes_per_update"]
        row: dict[str, Any] = {
            "label": r["label"], "codec": r["codec"], "bytes_per_update": bpu,
            "ratio_vs_fp32_raw": round(4 * r["num_params"] / bpu, 1) if bpu else None,
            "final_accuracy": r["final_accuracy"], "updates_accepted": r["updates_accepted"],
        }  # fmt: skip
        ref = dense.get((r["strategy"], r["bound"]))
        if ref is not None and ref is not r and bpu and ref["bytes_per_update"]:
            row["ratio_vs_fp32_run"] = round(ref["bytes_per_update"] / bpu, 1)
            row["accuracy_vs_fp32_run_pt"] = round(
                100 * (r["final_accuracy"] - ref["final_accuracy"]), 2)
        out.append(row)
    return out


def train_report(
    res: dict[str, Any], out_dir: Path
) -> tuple[dict[str, Any], list[str], list[Path]]:
    from loadtest import report

    rows = res["timeline"]
    curves = {r["label"]: r["curve"] for r in res["strategies"]}
    fed = {r["label"]: r.get("fed_curve", []) for r in res["strategies"]}
    target = float(res["settings"]["target_accuracy"])
    plots = [
        report.plot_accuracy(curves, target, out_dir / "accuracy_vs_time.png", fed=fed),
        report.plot_hist({r["label"]: r["staleness_hist"] for r in res["strategies"]},
                         out_dir / "staleness_hist.png", "Staleness of applied updates",
                         "staleness (versions)"),
        report.plot_rate(rows, "applied", out_dir / "updates_per_s.png",
                         "Updates applied per second (all shards' chunks)", "chunks/s",
                         group="strategy"),
        report.plot_states(rows, out_dir / "devices_by_state.png", "Devices by state (train)"),
    ]  # fmt: skip
    ok = all(r["updates_accepted"] > 0 for r in res["strategies"])
    summary = {"ok": ok, **res}
    st = res["settings"]
    headline = [f"train: task {st['task']}, {st['devices']} devices, target accuracy {target}"]
    for r in res["strategies"]:
        headline.append(
            f"  {r['label']}: time to target {r['time_to_target_s']} s, final acc "
            f"{r['final_accuracy']} (federated {r.get('final_fed_accuracy')} at "
            f"v{r.get('fed_version')}), accepted {r['updates_accepted']}, rejected "
            f"{r['aggregator_rejected']}, mean staleness {r['mean_staleness']}, bytes/update "
            f"{r['bytes_per_update']}"
        )
    for c in res.get("codecs", []):
        if "ratio_vs_fp32_run" in c:
            headline.append(f"  {c['label']}: {c['ratio_vs_fp32_run']}x fewer uplink bytes "
                            f"per update than fp32, accuracy {c['accuracy_vs_fp32_run_pt']:+} "
                            "pt")  # fmt: skip
    lb = " (lower bound: sync never reached the target)" if res["speedup_is_lower_bound"] else ""
    headline.append(f"  speedup async vs sync: {res['speedup_async_vs_sync']}{lb}")
    report.write(out_dir, summary, headline, plots)
    return summary, headline, plots
