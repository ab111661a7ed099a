"""Test-only entry point: the normal ``fedfleet agent`` with crash points injected.

    python -m tests.crashing_agent <crash point> [fedfleet agent flags ...]

Runs ``edge_agent.cli.main(flags, crash=CrashPoints(point))``: the settings, the probe and
the agent are built exactly as ``fedfleet agent`` builds them (``edge_agent.cli``), and the
process SIGKILLs itself at ``point`` (one of ``edge_agent.crash.CRASH_POINTS``), printing
``fedfleet-agent: crash point <point>`` first. Used by ``tests/test_agent_crash.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_agent.cli import main as agent_main
from edge_agent.crash import CRASH_POINTS, CrashPoints
from edge_agent.errors import SettingsError


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not args[0]:
        points = "|".join(CRASH_POINTS)
        print(f"usage: python -m tests.crashing_agent {points} [flags]", file=sys.stderr)
        return 2
    try:
        crash = CrashPoints(args[0])
    except SettingsError as exc:
        print(f"crashing_agent: {exc}", file=sys.stderr)
        return 2
    return agent_main(args[1:], crash=crash)


if __name__ == "__main__":
    raise SystemExit(main())
