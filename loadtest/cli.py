"""``fedfleet loadtest scale|train|churn|failover``: fleet simulations on real servers.

Each subcommand starts the stack (or uses ``--kafka/--mqtt/--redis``, ``FEDFLEET_KAFKA/MQTT/
REDIS`` or the stack file of ``fedfleet stack up``), the coordinator and
the aggregators, runs its scenario with bounded sizes and time, shows a progress bar on
stderr and writes a report directory (``--out``). ``--json`` prints the summary as the
last stdout line. Exit code 0 when the scenario's correctness checks pass (targets on
speed are reported, never asserted), 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.runner import environment
from schemas.errors import FedfleetError
from sim.byzantine import ATTACKS
from stack import StackSettings, envfile
from stack.errors import ConfigError
from stack.insecure import add_insecure_flag, warn_insecure


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka", metavar="HOST:PORT", help="use this Kafka instead of starting one")
    p.add_argument("--mqtt", metavar="URL", help="use this MQTT broker (mqtt://host:port; "
                   "with --insecure)")  # fmt: skip
    p.add_argument("--redis", metavar="URL", help="use this Redis (redis://host:port/db; "
                   "with --insecure)")  # fmt: skip
    add_insecure_flag(p, "anonymous MQTT, plain HTTP, no Redis password, and servers from "
                         "flags, FEDFLEET_* or the stack file",
                      "a secure stack of its own: TLS broker, HTTPS, Redis password, every "
                      "simulated device enrolled with its own credential")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="report directory")
    p.add_argument("--json", action="store_true", help="last stdout line is the JSON summary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from loadtest.churn import ChurnSettings
    from loadtest.failover import FAULTS, FailoverSettings
    from loadtest.scale import ScaleSettings
    from loadtest.train import TrainSettings
    from sim.tasks import TASKS

    p = argparse.ArgumentParser(prog="fedfleet loadtest", description=__doc__)
    sub = p.add_subparsers(dest="scenario", required=True)

    sc = sub.add_parser("scale", help="connect storm, telemetry lag, reconnect storm")
    d = ScaleSettings()
    sc.add_argument("--devices", type=int, default=d.devices)
    sc.add_argument("--processes", type=int, default=d.processes, help="fleet processes")
    sc.add_argument("--rate", type=float, default=d.rate, help="telemetry msgs/s, whole fleet")
    sc.add_argument("--duration", type=float, default=d.duration_s, help="steady phase (s)")
    sc.add_argument("--connect-rate", type=float, default=d.connect_per_s)
    sc.add_argument("--storm-timeout", type=float, default=d.storm_timeout_s)
    sc.add_argument("--device-mode", choices=("auto", "lean", "agent"), default=d.device_mode,
                    help="agent: real EdgeAgents; lean: wire-level devices (sim/lean.py: the "
                         "agent's MQTT session and messages, no training); auto: lean above "
                         "--lean-above devices")  # fmt: skip
    sc.add_argument("--lean-above", type=int, default=d.lean_above, metavar="N")
    sc.add_argument("--mqtt-brokers", type=int, default=d.mqtt_brokers, metavar="N",
                    help="Mosquitto processes the devices are spread over (default 0: enough "
                         "to keep each below 15,000 sessions, and the others below 20,000 "
                         "after losing one)")  # fmt: skip
    sc.add_argument("--kill-broker", action="store_true",
                    help="after the reconnect storm, stop the last broker and time its "
                         "devices' failover to the others")  # fmt: skip
    _server_flags(sc)

    tr = sub.add_parser("train", help="FedAsync vs FedBuff vs sync FedAvg, time to accuracy")
    t = TrainSettings()
    tr.add_argument("--task", choices=TASKS, default=t.task,
                    help="digits: built-in softmax; mnist1d: a PyTorch 1D CNN brought as an "
                         "ONNX model, 1,000 devices (needs fedfleet[torch])")  # fmt: skip
    # None: the task's default (sim.tasks.LEARNING), else TrainSettings'
    tr.add_argument("--devices", type=int, help=f"default {t.devices} (mnist1d: 1000)")
    tr.add_argument("--strategies", default=",".join(t.strategies))
    tr.add_argument("--codecs", default=",".join(t.codecs),
                    help="update encodings, one run each per strategy: fp32, fp16, int8, "
                         "topk<F>-<fp32|fp16|int8> (e.g. fp32,topk0.01-int8)")  # fmt: skip
    tr.add_argument("--max-updates", type=int, default=t.max_updates,
                    help="end each run after this many accepted updates (0: at the target)")
    tr.add_argument("--target-accuracy", type=float, help=f"default {t.target_accuracy}")
    tr.add_argument("--time-budget", type=float, default=t.budget_s, help="seconds per run")
    tr.add_argument("--concurrency", type=int, help=f"default {t.concurrency} (mnist1d: 10)")
    tr.add_argument("--lr", type=float,
                    help=f"default {t.lr} (mnist1d: Adam, 2e-3)")
    tr.add_argument("--local-epochs", type=int, help=f"default {t.local_epochs}")
    tr.add_argument("--batch-size", type=int, help=f"default {t.batch_size}")
    tr.add_argument("--time-scale", type=float, default=t.time_scale)
    tr.add_argument(
        "--task-seconds",
        type=float,
        default=t.task_s,
        help="median device's compute time per task (real s)",
    )
    tr.add_argument("--speed-sigma", type=float, default=t.speed_sigma)
    tr.add_argument("--over-selection", type=float, default=t.over_selection)
    tr.add_argument("--round-deadline", type=float, default=t.round_deadline_s)
    tr.add_argument("--processes", type=int, default=t.processes)
    tr.add_argument("--optimizer", choices=("sgd", "momentum", "adam"),
                    help="the devices' local optimizer (default: the task's; mnist1d: adam; "
                         "top-k codecs want momentum with --lr 0.05)")  # fmt: skip
    tr.add_argument("--momentum", type=float, default=t.momentum, help="for momentum")
    tr.add_argument("--byzantine", type=float, default=t.byzantine, metavar="SHARE",
                    help="share of the fleet that uploads forged models (digits task)")
    tr.add_argument("--attack", choices=ATTACKS, default=t.attack,
                    help="what a Byzantine device uploads (sim/byzantine.py)")
    tr.add_argument("--bounds", default=",".join(t.bounds),
                    help="the update-norm bound per run: on (the jobs' default adaptive "
                         "clipping), off, or on,off (every run with and without)")  # fmt: skip
    _server_flags(tr)

    ch = sub.add_parser("churn", help="devices vanish mid-task or flap; nothing stranded/lost")
    c = ChurnSettings()
    ch.add_argument("--devices", type=int, default=c.devices)
    ch.add_argument("--share", type=float, default=c.share, help="share of devices dropped")
    ch.add_argument("--duration", type=float, default=c.duration_s, help="churn window (s)")
    ch.add_argument("--lease", type=float, default=c.lease_s, help="task lease (s)")
    ch.add_argument("--concurrency", type=int, default=c.concurrency)
    ch.add_argument("--processes", type=int, default=c.processes)
    _server_flags(ch)

    fo = sub.add_parser(
        "failover", help="kill -9 aggregators (or Redis) mid-job; exactly once per shard"
    )
    f = FailoverSettings()
    fo.add_argument("--devices", type=int, default=f.devices)
    fo.add_argument("--concurrency", type=int, default=f.concurrency)
    fo.add_argument("--aggregators", type=int, default=f.aggregators, help="= job shards")
    fo.add_argument("--kills", type=int, default=f.kills)
    fo.add_argument("--warmup-updates", type=int, default=f.warmup_updates)
    fo.add_argument("--down", type=float, default=f.down_s, help="seconds a victim stays down")
    fo.add_argument("--between", type=float, default=f.between_s, help="seconds after a restart")
    fo.add_argument("--session-timeout-ms", type=int, default=f.session_timeout_ms)
    fo.add_argument("--fault", choices=FAULTS, default=f.fault,
                    help="what is killed: aggregators in turn, or redis-server (redis-wipe: "
                         "it also loses its data and comes back empty)")  # fmt: skip
    _server_flags(fo)

    fa = sub.add_parser(
        "faults", help="kill -9 / partition / slow link of each server, each on a host "
        "(network namespace) of its own; exactly once per shard",
    )  # fmt: skip
    _faults_flags(fa)
    return p


def _faults_flags(fa: argparse.ArgumentParser) -> None:
    from loadtest.faults import FAULTS, FaultSettings

    d = FaultSettings()
    fa.add_argument("--faults", default=",".join(d.faults),
                    help=f"comma-separated, in order: {', '.join(FAULTS)}; NAME:HOST picks "
                         "the host (partition:agg-2, slow:kafka-3)")  # fmt: skip
    for flag, name, kind in (("--devices", "devices", int), ("--concurrency", "concurrency", int),
                             ("--coordinators", "coordinators", int),
                             ("--aggregators", "aggregators", int),
                             ("--warmup-updates", "warmup_updates", int),
                             ("--down", "down_s", float), ("--partition-s", "partition_s", float),
                             ("--slow-s", "slow_s", float), ("--slow-kbit", "slow_kbit", int),
                             ("--slow-delay-ms", "slow_delay_ms", int),
                             ("--between", "between_s", float),
                             ("--resume-timeout", "resume_timeout_s", float),
                             ("--session-timeout-ms", "session_timeout_ms", int),
                             ("--kafka-heap-mb", "kafka_heap_mb", int)):  # fmt: skip
        fa.add_argument(flag, dest=name, type=kind, default=getattr(d, name))
    fa.add_argument("--out", type=Path, default=None, help="report directory")
    fa.add_argument("--json", action="store_true", help="last stdout line is the JSON summary")
    fa.add_argument("--seed", type=int, default=0)
    fa.add_argument("-v", "--verbose", action="store_true")


def train_values(args: argparse.Namespace) -> dict[str, Any]:
    """``train``'s flags given over the task's learning defaults."""
    from loadtest.train import task_defaults

    values = task_defaults(args.task)
    for name in ("devices", "target_accuracy", "concurrency", "lr", "local_epochs",
                 "batch_size"):  # fmt: skip
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return values


def stack_settings(args: argparse.Namespace) -> StackSettings:
    """The default: a secure stack of its own (its broker and Redis; Kafka may be shared).
    ``--insecure``: servers from flags > ``FEDFLEET_KAFKA/MQTT/REDIS`` > the stack file;
    else started, anonymous. (A Redis wipe, ``failover --fault redis-wipe``, runs secure
    too: the coordinator restores the devices' credentials from its credential journal.)"""
    if not args.insecure:
        if args.mqtt or args.redis:
            raise ConfigError("the secure default starts its own broker and Redis: drop "
                              "--mqtt/--redis, or add --insecure to use those servers")  # fmt: skip
        return StackSettings.from_env(kafka_url=args.kafka, secure=True)
    warn_insecure(f"fedfleet loadtest {args.scenario}")
    s = StackSettings.from_env(kafka_url=args.kafka, mqtt_url=args.mqtt, redis_url=args.redis)
    if args.scenario == "failover" and getattr(args, "fault", "aggregator") != "aggregator":
        return s  # a Redis fault kills the embedded redis-server: never a shared one
    return envfile.with_stack_file(s)


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], list[Path]]:
    out_dir: Path = args.out or Path("runs") / "loadtest" / args.scenario
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = bool(args.json) and not sys.stderr.isatty()
    log = lambda m: print(f"[stack] {m}", file=sys.stderr)  # noqa: E731
    if args.scenario == "scale":
        from loadtest.scale import ScaleSettings, brokers_for, run_scale, scale_report

        ss = ScaleSettings(devices=args.devices, processes=args.processes, rate=args.rate,
                           duration_s=args.duration, connect_per_s=args.connect_rate,
                           storm_timeout_s=args.storm_timeout, seed=args.seed,
                           device_mode=args.device_mode, lean_above=args.lean_above,
                           mqtt_brokers=args.mqtt_brokers,
                           kill_broker=args.kill_broker)  # fmt: skip
        n = brokers_for(ss.devices, ss.mqtt_brokers)
        stack = stack_settings(args)
        if n > 1:
            stack = dataclasses.replace(stack, mqtt_brokers=n)
        async with environment(stack, aggregators=0, log=log) as env:
            res = await run_scale(env, ss, quiet=quiet)
        return scale_report(res, out_dir)
    if args.scenario == "train":
        from loadtest.train import TrainSettings, run_train, train_report

        ts = TrainSettings(
            strategies=tuple(args.strategies.split(",")), budget_s=args.time_budget,
            time_scale=args.time_scale, task_s=args.task_seconds, speed_sigma=args.speed_sigma,
            over_selection=args.over_selection, round_deadline_s=args.round_deadline,
            processes=args.processes, seed=args.seed, task=args.task,
            codecs=tuple(args.codecs.split(",")), max_updates=args.max_updates,
            byzantine=args.byzantine, attack=args.attack,
            optimizer=args.optimizer or "", momentum=args.momentum,
            bounds=tuple(args.bounds.split(",")),
            **train_values(args),
        )  # fmt: skip
        async with environment(stack_settings(args), aggregators=2, log=log) as env:
            res = await run_train(env, ts, quiet=quiet)
        return train_report(res, out_dir)
    if args.scenario == "failover":
        from loadtest.failover import (
            FailoverSettings,
            aggregator_args,
            failover_report,
            run_failover,
        )

        fs = FailoverSettings(
            devices=args.devices, concurrency=args.concurrency, aggregators=args.aggregators,
            kills=args.kills, warmup_updates=args.warmup_updates, down_s=args.down,
            between_s=args.between, session_timeout_ms=args.session_timeout_ms, seed=args.seed,
            fault=args.fault,
        )  # fmt: skip
        async with environment(
            stack_settings(args), aggregators=fs.aggregators, log=log,
            aggregator_args=aggregator_args(fs),
        ) as env:  # fmt: skip
            res_f = await run_failover(env, fs, quiet=quiet)
        return failover_report(res_f, out_dir)
    if args.scenario == "faults":
        from dataclasses import fields

        from loadtest.faults import FaultSettings, cluster, faults_report, run_faults

        warn_insecure("fedfleet loadtest faults")  # hosts span namespaces: see loadtest/faults.py
        names = {f.name for f in fields(FaultSettings)} - {"faults"}
        fa = FaultSettings(faults=tuple(x for x in args.faults.split(",") if x),
                           **{k: v for k, v in vars(args).items() if k in names})  # fmt: skip
        async with cluster(fa, log, keep_logs=out_dir / "logs") as cl:
            res_fa = await run_faults(cl, fa, quiet=quiet)
        return faults_report(res_fa, out_dir)
    from loadtest.churn import ChurnSettings, churn_report, run_churn

    cs = ChurnSettings(devices=args.devices, share=args.share, duration_s=args.duration,
                       lease_s=args.lease, concurrency=args.concurrency,
                       processes=args.processes, seed=args.seed)  # fmt: skip
    async with environment(
        stack_settings(args), aggregators=2, log=log,
        coordinator_args=("--lease-s", str(cs.lease_s), "--selection-tick-s", "0.5"),
    ) as env:  # fmt: skip
        res = await run_churn(env, cs, quiet=quiet)
    return churn_report(res, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    t0 = time.monotonic()
    try:
        try:
            import uvloop

            summary, headline, _ = uvloop.run(_run(args))
        except ImportError:  # pragma: no cover
            summary, headline, _ = asyncio.run(_run(args))
    except FedfleetError as exc:
        print(f"fedfleet loadtest: error: {exc}", file=sys.stderr)
        return 2
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    for line in headline:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(report.clean(summary)))
    return 0 if summary.get("ok", True) else 1
