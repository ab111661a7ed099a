"""`fedfleet coordinator` and `fedfleet aggregator`: run one service process.

Each service has one typed settings dataclass with ``from_env()``; every field is also a
``--flag`` here (``--http-port 8000``), so env, CLI and code share one source of truth.
Server addresses (and the coordinator's admin token) nobody gave by flag or environment
variable come from the stack file (``stack.envfile``): flag > env > stack file > default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import types
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from schemas.errors import FedfleetError
from schemas.settings import parse_mqtt_url
from stack import envfile
from stack.errors import ConfigError
from stack.launcher import kafka_bootstrap, preflight

ENV_PREFIX = {"CoordinatorSettings": envfile.COORDINATOR, "AggregatorSettings": envfile.AGGREGATOR}


def _flag_type(tp: Any) -> Callable[[str], Any] | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    if tp is bool:
        return None
    if tp in (int, float, str, Path):
        return tp  # type: ignore[no-any-return]
    if origin is typing.Literal:
        return str
    return None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (also FEDFLEET_* env vars)")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction)
            continue
        conv = _flag_type(tp)
        if conv is None:
            continue
        group.add_argument(flag, dest=f"cfg_{f.name}", type=conv, metavar=f.name.upper())


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "kafka", None):
        out["kafka_bootstrap"] = kafka_bootstrap(args.kafka)
    if getattr(args, "mqtt", None):
        try:
            host, port, tls = parse_mqtt_url(args.mqtt)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if tls and not getattr(args, "cfg_mqtt_cafile", None):
            raise ConfigError(f"MQTT: {args.mqtt} is TLS: give the fleet CA (--mqtt-cafile) "
                              "and the broker credential (--mqtt-username, "
                              "--mqtt-password-file)")  # fmt: skip
        out["mqtt_host"], out["mqtt_port"] = host, port
    if getattr(args, "redis", None):
        out["redis_url"] = args.redis
    return out


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from aggregator.settings import AggregatorSettings
    from coordinator.settings import CoordinatorSettings

    c = sub.add_parser("coordinator", help="run the fleet coordinator (MQTT, Kafka, REST)")
    for p in (c,):
        p.add_argument("--kafka", metavar="HOST:PORT")
        p.add_argument("--mqtt", metavar="URL")
        p.add_argument("--redis", metavar="URL")
    add_dataclass_flags(c, CoordinatorSettings)
    c.set_defaults(func=run_coordinator)

    a = sub.add_parser("aggregator", help="run one aggregator worker (a Kafka consumer)")
    a.add_argument("--kafka", metavar="HOST:PORT")
    add_dataclass_flags(a, AggregatorSettings)
    a.set_defaults(func=run_aggregator)


def build_settings(cls: Any, args: argparse.Namespace) -> Any:
    """``cls`` (a service settings dataclass) from flags > env > stack file > defaults."""
    values = {**server_overrides(args), **overrides_from(args)}
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k in names}
    values = {**envfile.defaults_for(ENV_PREFIX[cls.__name__], names - set(values)), **values}
    try:
        return cls.from_env(**values)
    except FedfleetError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _run_until_signal(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    return 0


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator
    from coordinator.settings import CoordinatorSettings

    settings = build_settings(CoordinatorSettings, args)
    preflight(
        kafka=settings.kafka_bootstrap,
        mqtt=(settings.mqtt_host, settings.mqtt_port),
        redis=settings.redis_url,
        mqtt_credentials=settings.mqtt_credentials(),
        kafka_auth=settings.kafka_login(),
    )

    async def body(stop: asyncio.Event) -> None:
        async with Coordinator(settings) as coord:
            print(f"coordinator REST at {coord.rest_url}", flush=True)
            await stop.wait()

    return _run_until_signal(body)


def run_aggregator(args: argparse.Namespace) -> int:
    from aggregator.settings import AggregatorSettings
    from aggregator.worker import AggregatorWorker

    settings = build_settings(AggregatorSettings, args)
    preflight(kafka=settings.kafka_bootstrap, kafka_auth=settings.kafka_login())

    async def body(stop: asyncio.Event) -> None:
        async with AggregatorWorker(settings) as worker:
            print(f"aggregator {getattr(settings, 'instance_id', '')} running", flush=True)
            run = asyncio.create_task(worker.run())
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                run.result()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    return _run_until_signal(body)


__all__ = ["add_dataclass_flags", "build_settings", "register"]
