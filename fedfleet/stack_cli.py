"""`fedfleet stack up | down | status | fetch`."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import threading
from pathlib import Path

from stack import LocalStack, StackInfo, StackSettings
from stack.errors import StackError
from stack.kafka import cache_root, kafka_lib_dir
from stack.procs import kill_tree, pid_alive


def state_file() -> Path:
    return cache_root() / "stack" / "stack.json"


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka", metavar="HOST:PORT", help="use this Kafka instead of starting one")
    p.add_argument("--mqtt", metavar="URL", help="use this MQTT broker (mqtt://host:port)")
    p.add_argument("--redis", metavar="URL", help="use this Redis (redis://host:port/db)")
    p.add_argument("--kafka-nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--kafka-heap-mb", type=int, default=512, help="JVM heap per Kafka node")


def settings_from(args: argparse.Namespace, **extra: object) -> StackSettings:
    return StackSettings.from_env(
        kafka_url=args.kafka, mqtt_url=args.mqtt, redis_url=args.redis,
        kafka_nodes=args.kafka_nodes, kafka_heap_mb=args.kafka_heap_mb, **extra,
    )  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stack", help="run the local Kafka/MQTT/Redis stack")
    ss = p.add_subparsers(dest="stack_cmd", required=True)
    up = ss.add_parser("up", help="start the stack (foreground until Ctrl-C, or --detach)")
    add_server_flags(up)
    up.add_argument("--detach", action="store_true", help="leave it running; stop with `down`")
    up.add_argument("--json", action="store_true")
    ss.add_parser("down", help="stop a detached stack")
    ss.add_parser("status", help="show the detached stack")
    ss.add_parser("fetch", help="download Apache Kafka's jars from Maven Central (cached)")
    p.set_defaults(func=run)


def _print(info: StackInfo, as_json: bool) -> None:
    if as_json:
        print(info.to_json())
        return
    for name, desc in info.describe().items():
        print(f"  {name:6s} {desc}")


def run(args: argparse.Namespace) -> int:
    cmd = args.stack_cmd
    if cmd == "fetch":
        lib = kafka_lib_dir()
        if lib is None:
            raise StackError("Kafka: java and mvn are needed to fetch the jars")
        print(f"Kafka jars in {lib}")
        return 0
    if cmd == "status":
        return _status()
    if cmd == "down":
        return _down()
    # up
    if args.detach:
        if state_file().exists():
            raise StackError(f"a detached stack is already recorded in {state_file()}; `down` it")
        workdir = state_file().parent / "run"
        shutil.rmtree(workdir, ignore_errors=True)
        launcher = LocalStack(settings_from(args, detach=True, workdir=workdir), log=print)
        info = launcher.start()
        state_file().write_text(info.to_json())
        _print(info, args.json)
        return 0
    launcher = LocalStack(settings_from(args), log=print)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        info = launcher.start()
        _print(info, args.json)
        print("stack is up; Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        launcher.stop()
    return 0


def _status() -> int:
    f = state_file()
    if not f.exists():
        print("no detached stack")
        return 1
    info = StackInfo.from_json(f.read_text())
    alive = [p for p in info.pids if pid_alive(p)]
    _print(info, False)
    print(f"  processes alive: {len(alive)}/{len(info.pids)}")
    return 0 if len(alive) == len(info.pids) else 1


def _down() -> int:
    f = state_file()
    if not f.exists():
        print("no detached stack")
        return 0
    info = StackInfo.from_json(f.read_text())
    for pid in info.pids:
        kill_tree(pid, timeout=15.0)
    if info.workdir:
        shutil.rmtree(info.workdir, ignore_errors=True)
    f.unlink()
    left = [p for p in info.pids if pid_alive(p)]
    print(json.dumps({"stopped": len(info.pids) - len(left), "left": left}))
    return 0 if not left else 1


__all__ = ["add_server_flags", "register", "settings_from"]
