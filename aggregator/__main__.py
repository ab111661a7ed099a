"""``python -m aggregator``: run one shard worker until SIGINT/SIGTERM.

Settings come from ``FEDFLEET_AGG_*`` variables, overridden by the flags below; the
``fedfleet aggregator`` CLI builds the same :class:`AggregatorSettings` and calls
:func:`serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aggregator.settings import AggregatorSettings


async def serve(settings: AggregatorSettings) -> None:
    """Run a worker until SIGINT/SIGTERM; checkpoint and commit on the way out."""
    from aggregator.worker import AggregatorWorker

    worker = AggregatorWorker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.request_stop)
    async with worker:
        await worker.run()


def _exit_early(signum: int, frame: object) -> None:
    sys.exit(0)  # nothing consumed yet, nothing to checkpoint


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _exit_early)
    from aggregator.settings import AggregatorSettings

    p = argparse.ArgumentParser(prog="python -m aggregator")
    p.add_argument("--kafka-bootstrap")
    p.add_argument("--group-id")
    p.add_argument("--topic-prefix")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--publish-every", type=int)
    p.add_argument("--min-publish-interval-s", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(message)s")
    overrides = {k: v for k, v in vars(a).items() if v is not None and k not in ("log_level",)}
    asyncio.run(serve(AggregatorSettings.from_env(**overrides)))


if __name__ == "__main__":
    main()
