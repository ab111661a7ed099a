"""The `fedfleet` command: stack, demo, coordinator, aggregator, agent, job, loadtest,
deploy."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from schemas.errors import FedfleetError


def build_parser() -> argparse.ArgumentParser:
    from fedfleet import demo, deploy_cli, example_data, job_cli, services, stack_cli

    parser = argparse.ArgumentParser(
        prog="fedfleet", description="Asynchronous federated learning for edge fleets"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    stack_cli.register(sub)
    demo.register(sub)
    services.register(sub)
    job_cli.register(sub)
    example_data.register(sub)
    deploy_cli.register(sub)
    # parsed by their own packages (see main); listed here so --help shows them
    sub.add_parser("agent", help="the edge agent: run on a device, predict (fedfleet agent -h)")
    sub.add_parser("loadtest", help="fleet simulations: scale, train, churn, failover")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands owned by other packages parse their own flags.
    if argv and argv[0] == "agent":
        from edge_agent.cli import main as agent_main
        from fedfleet.agent_defaults import stack_file_env

        def agent() -> int:
            with stack_file_env(argv[1:]):  # the stack file's broker and coordinator URL
                return agent_main(argv[1:])

        return _guard(agent)
    if argv and argv[0] == "loadtest":
        from loadtest.cli import main as loadtest_main

        return _guard(lambda: loadtest_main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _guard(lambda: int(args.func(args) or 0))


def _guard(fn: object) -> int:
    """Run a command; any fedfleet error (settings, servers, ...) is one line and exit 2
    (or the error's own ``exit_code``)."""
    assert callable(fn)
    try:
        return int(fn())
    except FedfleetError as exc:
        print(f"fedfleet: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("fedfleet: interrupted", file=sys.stderr)
        return 130
