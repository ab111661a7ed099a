"""`fedfleet stack up | down | status | env | fetch`.

``up`` writes the stack file (``stack.envfile``: the servers' addresses, the coordinator URL
and an admin token) that every other command reads by default; ``down`` removes it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from stack import LocalStack, StackInfo, StackSettings, envfile
from stack.errors import StackError
from stack.insecure import add_insecure_flag, warn_insecure
from stack.kafka import cache_root, kafka_lib_dir
from stack.mqtt import AUTH_STORES
from stack.procs import kill_tree, pid_alive


def state_file() -> Path:
    """The stack file (``$FEDFLEET_STACK_FILE`` or ``~/.cache/fedfleet/stack/stack.json``)."""
    return envfile.path()


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka", metavar="HOST:PORT", help="use this Kafka instead of starting one")
    p.add_argument("--mqtt", metavar="URL", help="use this MQTT broker (mqtt://host:port)")
    p.add_argument("--redis", metavar="URL", help="use this Redis (redis://host:port/db)")
    p.add_argument("--kafka-nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--kafka-heap-mb", type=int, default=512, help="JVM heap per Kafka node")


def settings_from(
    args: argparse.Namespace, *, use_stack_file: bool = False, **extra: object
) -> StackSettings:
    """Servers from flags > ``FEDFLEET_KAFKA/MQTT/REDIS`` > (``use_stack_file``) the stack
    file; a server named nowhere is started locally."""
    s = StackSettings.from_env(
        kafka_url=args.kafka, mqtt_url=args.mqtt, redis_url=args.redis,
        kafka_nodes=args.kafka_nodes, kafka_heap_mb=args.kafka_heap_mb, **extra,
    )  # fmt: skip
    return envfile.with_stack_file(s) if use_stack_file else s


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stack", help="run the local Kafka/MQTT/Redis stack")
    ss = p.add_subparsers(dest="stack_cmd", required=True)
    up = ss.add_parser("up", help="start the stack (foreground until Ctrl-C, or --detach)")
    add_server_flags(up)
    up.add_argument("--detach", action="store_true", help="leave it running; stop with `down`")
    up.add_argument("--json", action="store_true")
    add_insecure_flag(up, "an anonymous plain-TCP broker, plain HTTP, Redis without a "
                          "password",
                      "the secure mode: TLS from a fleet CA, no anonymous access, per-device "
                      "credentials the coordinator enrols, a Redis password")  # fmt: skip
    up.add_argument("--broker-auth", choices=AUTH_STORES, default="passwd",
                    help="where the secure broker keeps device credentials: its password "
                         "file (default; scales to 100,000 devices) or the "
                         "dynamic-security plugin")  # fmt: skip
    up.add_argument("--mqtt-brokers", type=int, default=1, metavar="N",
                    help="Mosquitto processes to spread the fleet over (each below its "
                         "20,000 open files; one password file and ACL for all)")  # fmt: skip
    up.add_argument("--admin-token", help="admin token recorded for coordinators and "
                    "`fedfleet job` (default: a random one)")  # fmt: skip
    up.add_argument(
        "--coordinator-url",
        default=envfile.DEFAULT_COORDINATOR_URL,
        help="coordinator REST URL the agents and `fedfleet job` default to",
    )
    ss.add_parser("down", help="stop a detached stack, remove the stack file")
    ss.add_parser("status", help="show the detached stack")
    ss.add_parser("env", help="print the stack file as shell exports: "
                  'eval "$(fedfleet stack env)"')  # fmt: skip
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
    if cmd == "env":
        return _env()
    # up
    old = envfile.read()
    if old is not None and old.info.pids and not any(pid_alive(p) for p in old.info.pids):
        envfile.remove()  # its processes are gone (a reboot, a kill): a stale record
    elif old is not None:
        raise StackError(f"a stack is already recorded in {state_file()}; `fedfleet stack down` "
                         "it first")  # fmt: skip
    token = args.admin_token or secrets.token_urlsafe(18)
    log = print if not args.json else (lambda m: print(m, file=sys.stderr))
    secure = not args.insecure
    if not secure:
        warn_insecure("fedfleet stack up")
    mode: dict[str, Any] = (
        {"secure": secure, "broker_auth": args.broker_auth} if secure else {"secure": False}
    )
    mode["mqtt_brokers"] = args.mqtt_brokers
    if args.detach:
        workdir = cache_root() / "stack" / "run"
        shutil.rmtree(workdir, ignore_errors=True)
        launcher = LocalStack(settings_from(args, detach=True, workdir=workdir, **mode),
                              log=log)  # fmt: skip
        info = launcher.start()
        _record(info, args, token)
        _print(info, args.json)
        return 0
    launcher = LocalStack(settings_from(args, **mode), log=log)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    recorded = False
    try:
        info = launcher.start()
        _record(info, args, token)
        recorded = True
        _print(info, args.json)
        print("stack is up; Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        launcher.stop()
        if recorded:
            envfile.remove()
    return 0


def _record(info: StackInfo, args: argparse.Namespace, token: str) -> None:
    url = args.coordinator_url
    if info.tls_certfile and url.startswith("http://"):  # a secure stack serves HTTPS
        url = "https://" + url[len("http://"):]
    where = envfile.write(envfile.StackFile(info=info, coordinator_url=url,
                                            admin_token=token))  # fmt: skip
    if not args.json:
        print(f"addresses in {where}: every fedfleet command uses them; for a shell, "
              'eval "$(fedfleet stack env)"', flush=True)  # fmt: skip


def _env() -> int:
    sf = envfile.read()
    if sf is None:
        print(f"fedfleet: no stack file at {state_file()} (`fedfleet stack up --detach`)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"# fedfleet stack at {state_file()}")
    for line in envfile.exports(sf):
        print(line)
    return 0


def _status() -> int:
    sf = envfile.read()
    if sf is None:
        print("no detached stack")
        return 1
    info = sf.info
    alive = [p for p in info.pids if pid_alive(p)]
    _print(info, False)
    print(f"  processes alive: {len(alive)}/{len(info.pids)}")
    return 0 if len(alive) == len(info.pids) else 1


def _down() -> int:
    sf = envfile.read()
    if sf is None:
        print("no detached stack")
        return 0
    info = sf.info
    for pid in info.pids:
        kill_tree(pid, timeout=15.0)
    if info.workdir:
        shutil.rmtree(info.workdir, ignore_errors=True)
    envfile.remove()
    left = [p for p in info.pids if pid_alive(p)]
    print(json.dumps({"stopped": len(info.pids) - len(left), "left": left}))
    return 0 if not left else 1


__all__ = ["add_server_flags", "register", "settings_from"]
