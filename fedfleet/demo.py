"""`fedfleet demo`: one asynchronous training job on real servers, end to end.

Starts the stack (or uses servers given by URL), the coordinator and two aggregator shards
as processes, then a simulated fleet of real edge agents in this process; trains a softmax
regression on non-IID shards of scikit-learn's digits until a target accuracy or a time
budget, then writes the final model as ONNX and checks it with onnxruntime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedfleet.stack_cli import add_server_flags, settings_from
from sim.monitor import ModelMonitor, ProgressView
from sim.tasks import DEFAULTS, TASKS, central_reference, load_task
from stack import LocalStack, StackInfo
from stack.errors import StackError
from stack.insecure import add_insecure_flag, warn_insecure


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    devices: int = 200
    shards: int = 2
    aggregators: int = 2
    target_accuracy: float = 0.90
    time_budget_s: float = 240.0
    concurrency: int = 20
    alpha: float = 0.6
    staleness_a: float = 0.5
    lr: float = 0.5
    local_epochs: int = 5
    batch_size: int = 8
    topk: float = 0.0
    quant: str = "int8"
    dirichlet_alpha: float = 0.5
    time_scale: float = 60.0
    seed: int = 0
    stable_versions: int = 3  # consecutive new versions at/above target (see stable())
    out_dir: Path = field(default_factory=lambda: Path("runs") / "demo")
    as_json: bool = False
    task: str = "digits"  # sim.tasks
    publish_every: int = 1
    eval_every: int = 20
    eval_devices: int = 0  # 0: half the fleet, at most 100
    final_devices: int = 0  # 0: every device
    central_epochs: int = 0  # mnist1d: the centrally trained reference (0: none)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="train one job end to end on real servers")
    add_server_flags(p)
    d = DemoSettings()
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="digits: built-in softmax on 8x8 digits; mnist1d: a PyTorch 1D "
                        "CNN (your own model) on MNIST-1D, 1,000 devices")  # fmt: skip
    # None: the task's default (sim.tasks.DEFAULTS), else DemoSettings'
    p.add_argument("--devices", type=int, help=f"default {d.devices} (mnist1d: 1000)")
    p.add_argument("--shards", type=int, default=d.shards)
    p.add_argument("--aggregators", type=int, default=d.aggregators)
    p.add_argument("--target-accuracy", type=float, help=f"default {d.target_accuracy}")
    p.add_argument("--time-budget", type=float, dest="time_budget_s",
                   help=f"seconds (default {d.time_budget_s:g}; mnist1d: 1200)")  # fmt: skip
    p.add_argument("--concurrency", type=int, help=f"default {d.concurrency} (mnist1d: 10)")
    p.add_argument("--alpha", type=float, help=f"FedAsync mixing α (default {d.alpha})")
    p.add_argument("--lr", type=float,
                   help=f"default {d.lr} (mnist1d: Adam, 2e-3)")
    p.add_argument("--local-epochs", type=int, help=f"default {d.local_epochs} (mnist1d: 3)")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size} (mnist1d: 16)")
    p.add_argument("--topk", type=float, default=d.topk, help="top-k fraction (0 = dense)")
    p.add_argument("--quant", choices=("none", "fp16", "int8"), default=d.quant)
    p.add_argument("--time-scale", type=float, default=d.time_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=d.out_dir)
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    add_insecure_flag(p, "anonymous MQTT, plain HTTP, no Redis password, and servers from "
                         "flags, FEDFLEET_* or the stack file",
                      "its own stack in the secure mode: TLS broker and HTTPS, every device "
                      "enrolled with its own credential")  # fmt: skip
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> DemoSettings:
    """The flags over the task's defaults over ``DemoSettings``'."""
    values: dict[str, Any] = dict(DEFAULTS.get(args.task, {}))
    for name in ("devices", "target_accuracy", "time_budget_s", "concurrency", "alpha", "lr",
                 "local_epochs", "batch_size"):  # fmt: skip
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return DemoSettings(
        shards=args.shards, aggregators=args.aggregators, topk=args.topk, quant=args.quant,
        time_scale=args.time_scale, seed=args.seed, out_dir=args.out, as_json=args.json,
        task=args.task, **values,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if settings.devices < 1 or settings.shards < 1:
        raise StackError("demo: --devices and --shards must be >= 1")
    secure = not getattr(args, "insecure", False)
    if secure and (args.mqtt or args.redis):
        raise StackError("demo: the secure default starts its own broker and Redis; drop "
                         "--mqtt/--redis, or add --insecure to use those servers")  # fmt: skip
    if not secure:
        warn_insecure("fedfleet demo")
    stack = LocalStack(settings_from(args, use_stack_file=not secure, secure=secure),
                       log=lambda m: print(f"[stack] {m}", file=sys.stderr))  # fmt: skip
    summary = _run_loop(demo(settings, stack))
    if settings.as_json:
        print(json.dumps(summary))
    return 0 if summary["target_reached"] else 1


def _run_loop(coro: Any) -> Any:
    """Run ``coro``; SIGTERM cancels it so every server and service is stopped on the way out."""

    async def main() -> Any:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main())
    return uvloop.run(main())


def stable(streak: int, updates_in_streak: int, s: DemoSettings) -> bool:
    """Stop rule: ``stable_versions`` consecutive new versions at or above the target that
    together folded in at least twice ``concurrency`` updates. Up to ``concurrency`` uploads
    are still in flight at the stop and land afterwards; a stretch that has absorbed two such
    generations without dropping below the target makes a drained model under the target
    unlikely (with 3 versions / 1 generation, 2 of 6 runs ended 2 test images short)."""
    return streak >= s.stable_versions and updates_in_streak >= 2 * s.concurrency


def _keep_logs(workdir: Path, dest: Path) -> None:
    """Copy the services' logs next to the results, then remove their scratch directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy2(log, dest / log.name)
    shutil.rmtree(workdir, ignore_errors=True)


def job_body(s: DemoSettings, spec: dict[str, Any] | None = None, *,
             model_name: str = "digits", train_extra: dict[str, Any] | None = None,
             ) -> dict[str, Any]:  # fmt: skip
    """The demo's job; ``spec`` the model's (default the digits softmax)."""
    ev = s.eval_devices or max(1, min(100, s.devices // 2))
    return {
        "model_name": model_name,
        "spec": spec or {"family": "softmax", "n_features": 64, "n_classes": 10},
        "shards": s.shards,
        "strategy": {
            "name": "fedasync", "alpha": s.alpha, "staleness": "polynomial",
            "staleness_a": s.staleness_a,
        },
        "train": {"lr": s.lr, "local_epochs": s.local_epochs, "batch_size": s.batch_size,
                  **(train_extra or {})},
        "codec": {"topk": s.topk, "quant": s.quant},
        "concurrency": s.concurrency,
        "target_accuracy": s.target_accuracy,
        "init_seed": s.seed,
        "publish_every": s.publish_every,
        # half the fleet scores every 20th version on its held-out rows (a device holds
        # out ~1-2 of its digits, so it takes many devices for a figure worth reading)
        "evaluation": {"every_versions": s.eval_every, "devices": ev,
                       "min_reports": max(1, ev * 3 // 4), "timeout_s": 60.0},
    }  # fmt: skip


async def final_evaluation(
    http: httpx.AsyncClient, admin: dict[str, str], job_id: str, version: int, devices: int,
    *, timeout_s: float,
) -> dict[str, Any] | None:  # fmt: skip
    """Have up to ``devices`` devices score ``version`` of the stopped job
    (``POST /v1/jobs/{id}/evaluate``) and wait until that evaluation closes; its JSON
    (None: the coordinator refused it or it did not close in ``timeout_s``)."""
    r = await http.post(f"/v1/jobs/{job_id}/evaluate", headers=admin,
                        json={"version": version, "devices": devices})  # fmt: skip
    if r.status_code != 202:
        print(f"[demo] no final evaluation: {r.status_code} {r.text}", file=sys.stderr)
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        with contextlib.suppress(httpx.HTTPError):
            final = (await http.get(f"/v1/jobs/{job_id}/metrics")).json().get("final")
            if final and final.get("closed_ts") is not None:
                return dict(final)
    return None


async def demo(s: DemoSettings, launcher: LocalStack) -> dict[str, Any]:
    from sim.enrol import enrol_if_secure
    from sim.fleet import FleetSpec, SimulatedFleet
    from sim.load_services import Api
    from sim.services import ServiceSet

    t0 = time.monotonic()
    err = sys.stderr
    task = load_task(s.task, s.seed)
    train, test = task.train, task.test
    s.out_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        info: StackInfo = await stack.enter_async_context(launcher)
        for name, desc in info.describe().items():
            print(f"[stack] {name}: {desc}", file=err)
        workdir = Path(tempfile.mkdtemp(prefix="fedfleet-demo-"))
        # On servers it did not start (flags, env, the stack file) the demo keeps to its own
        # topics, Redis keys and device ids, so it never meets another deployment's jobs.
        shared = "external" in (info.kafka_impl, info.mqtt_impl, info.redis_impl)
        run = f"demo{secrets.token_hex(3)}" if shared else ""
        services = ServiceSet(info, workdir, aggregators=s.aggregators,
                              topic_prefix=f"{run}." if run else "fl.")  # fmt: skip
        stack.callback(_keep_logs, workdir, s.out_dir / "logs")
        stack.callback(services.stop)
        await services.start()
        print(f"[demo] coordinator REST: {services.rest_url}  (try {services.rest_url}/v1/fleet"
              f" and {services.rest_url}/docs)", file=err)  # fmt: skip
        admin = {"Authorization": f"Bearer {services.admin_token}"}
        # as the operator: fleet-status reads need a token on a secure stack
        async with httpx.AsyncClient(base_url=services.rest_url, timeout=30.0,
                                     verify=services.verify, headers=admin) as http:  # fmt: skip
            spec = await Api(http, services.admin_token).model_spec(task)
            body = job_body(s, spec, model_name=task.model_name, train_extra=task.train_extra)
            r = await http.post("/v1/jobs", json=body, headers=admin)
            if r.status_code >= 300:
                raise StackError(f"demo: creating the job failed: {r.status_code} {r.text}")
            job = r.json()
            job_id = job["job_id"]
            key = (await http.get("/v1/keys/model-signing")).json()["public_key"]
            fleet_spec = FleetSpec(
                devices=s.devices, seed=s.seed, dirichlet_alpha=s.dirichlet_alpha,
                time_scale=s.time_scale, id_prefix=run or "dev",
            )  # fmt: skip
            # on a secure stack every simulated device enrols, as a phone would
            enrolled = await enrol_if_secure(http, services, fleet_spec.device_ids())
            if enrolled.credentials is not None:
                print(f"[demo] enrolled {len(enrolled.credentials)} devices in "
                      f"{enrolled.seconds:.1f}s", file=err)  # fmt: skip
            fleet = SimulatedFleet(
                fleet_spec, train, mqtt_host=info.mqtt_host, mqtt_port=info.mqtt_port,
                api_url=services.rest_url, public_key_hex=key,
                credentials=enrolled.credentials, ca_file=enrolled.ca_file,
            )  # fmt: skip
            await stack.enter_async_context(fleet)
            monitor = ModelMonitor(http, task.model_name, job_id, test, public_key_hex=key)
            view = ProgressView(s.target_accuracy, s.time_budget_s, quiet=s.as_json)
            streak = streak_from = 0
            poll_errors = 0
            with view:
                while True:
                    services.check_alive()
                    prev = monitor.snap.version
                    try:
                        snap = await monitor.poll()
                        poll_errors = 0
                    except (httpx.HTTPError, StackError) as exc:
                        poll_errors += 1  # a busy coordinator may time out; retry a while
                        if poll_errors >= 10:
                            msg = f"demo: coordinator REST keeps failing: {exc}"
                            raise StackError(msg) from None
                        await asyncio.sleep(1.0)
                        continue
                    view.update(snap, fleet.stats())
                    if snap.version != prev:  # the streak counts from the last miss
                        if snap.accuracy < s.target_accuracy:
                            streak, streak_from = 0, snap.updates_applied
                        else:
                            streak += 1
                    if stable(streak, snap.updates_applied - streak_from, s):
                        break
                    if time.monotonic() - t0 >= s.time_budget_s:
                        break
                    await asyncio.sleep(0.5)
            # Stop selecting, let every upload already acknowledged land (exactly once),
            # then have the whole fleet score that final version on its held-out rows
            # (next to the central figure of the same version), then stop the fleet.
            await http.post(f"/v1/jobs/{job_id}/stop", headers=admin)
            fleet_view = (await http.get("/v1/fleet")).json()
            snap = await monitor.drain(quiet_s=2.0, timeout_s=30.0)
            final = await final_evaluation(http, admin, job_id, snap.version,
                                           s.final_devices or s.devices,
                                           timeout_s=90.0)  # fmt: skip
            fleet_stats = fleet.stats()
            await fleet.stop()
            onnx_path = s.out_dir / f"{task.model_name}.onnx"
            onnx_version, onnx_acc = await monitor.export_onnx(onnx_path)
            job_view = (await http.get(f"/v1/jobs/{job_id}")).json()
            rejections = await services.aggregator_rejections()
    wall = time.monotonic() - t0  # the federated run, servers stopped
    central = await asyncio.to_thread(central_reference, task, s.central_epochs, s.seed)
    summary = {
        "accuracy": round(snap.accuracy, 4),
        "onnx_accuracy": round(onnx_acc, 4),
        "target_accuracy": s.target_accuracy,
        "target_reached": snap.accuracy >= s.target_accuracy,
        "updates_applied": snap.updates_applied,
        "updates_accepted": int(job_view.get("updates_accepted", 0)),
        "updates_rejected": int(job_view.get("updates_rejected", 0)),
        "rejected_by_reason": rejections,
        "onnx_model_version": onnx_version,
        "devices": s.devices,
        "devices_participated": fleet_stats.get("devices_participated", 0),
        "mean_staleness": round(snap.mean_staleness, 3),
        # the latest federated evaluation (devices' held-out splits; None: none served)
        "fed_accuracy": None if snap.fed_accuracy is None else round(snap.fed_accuracy, 4),
        "fed_version": snap.fed_version,
        "fed_by_version": {str(v): round(a, 4) for v, a in sorted(monitor.fed_by_version.items())},
        # the final version scored by the fleet (every device once, its held-out rows)
        "final_federated": final,
        # mnist1d: the same model trained centrally on the pooled rows, same test rows
        "central_reference": central,
        # the same versions on the central held-out split (the cross-check)
        "central_by_version": {str(v): round(a, 4)
                               for v, a in sorted(monitor.central_by_version.items())},
        "model_version": snap.version,
        "shard_versions": snap.shard_versions,
        "onnx_path": str(onnx_path.resolve()),
        "wall_s": round(wall, 1),
        "stack": info.describe(),
        "fleet": {k: v for k, v in fleet_view.items() if isinstance(v, int | float | str)},
    }
    (s.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not s.as_json:
        print(json.dumps(summary, indent=2))
    if final is not None and final.get("accuracy") is not None:
        fed = (f"federated {final['accuracy']:.3f} on {final['examples']} held-out rows of "
               f"{final['reports']} devices")  # fmt: skip
    elif snap.fed_accuracy is not None:
        fed = f"federated {snap.fed_accuracy:.3f} at v{snap.fed_version}"
        if snap.fed_version in monitor.central_by_version:
            fed += f", central {monitor.central_by_version[snap.fed_version]:.3f} there"
    else:
        fed = "no federated evaluation"
    print(
        f"[demo] held-out accuracy {summary['accuracy']:.3f} (onnx {onnx_acc:.3f}; {fed}) "
        f"after {snap.updates_applied} updates in {wall:.0f}s; model at {onnx_path}",
        file=err,
    )
    if central is not None:
        print(f"[demo] the same model trained centrally ({central['epochs']} epochs on the "
              f"pooled rows): {central['accuracy']:.3f}", file=err)  # fmt: skip
    return summary
