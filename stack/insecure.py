"""The one loud warning every entry point prints when it runs without the secure mode.

Secure is the default of ``fedfleet stack up``, ``fedfleet demo`` and the load tests
(docs/security.md); ``--insecure`` turns it off for debugging, and says so on stderr in a
block that cannot be missed, naming what is open.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

WHAT_IS_OPEN = (
    "anonymous MQTT in plain TCP: any client may connect, read every device's tasks and "
    "publish as any device",
    "REST over plain HTTP; fleet-status reads need no token",
    "Redis without a password",
    "Kafka in plain text, without a login",
)


def banner(command: str) -> str:
    rule = "!" * 78
    lines = [rule, f"!! INSECURE: {command} runs with --insecure (for debugging only)"]
    lines += [f"!!   - {w}" for w in WHAT_IS_OPEN]
    lines += ["!! Never expose these servers beyond this machine. docs/security.md", rule]
    return "\n".join(lines)


def warn_insecure(command: str, out: TextIO | None = None) -> None:
    """Print the banner for ``command`` on stderr (or ``out``)."""
    print(banner(command), file=out or sys.stderr, flush=True)


def add_insecure_flag(p: argparse.ArgumentParser, insecure: str, default: str) -> None:
    """``--insecure`` (help: ``insecure`` says what it turns off, ``default`` what runs
    without it) and a hidden ``--secure`` that earlier versions needed and is now a no-op."""
    p.add_argument("--insecure", action="store_true",
                   help=f"debugging only: {insecure} (the default is {default}; "
                        "docs/security.md)")  # fmt: skip
    p.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)  # the default
