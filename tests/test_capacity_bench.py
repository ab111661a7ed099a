"""The capacity bench's pure helpers (bench/capacity.py), on hand-written inputs.

The bench is a script, not a package, so it is loaded from its path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench" / "capacity.py"


@functools.cache
def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_proc_cpu_s_reads_utime_plus_stime_past_a_comm_with_spaces() -> None:
    clk = os.sysconf("SC_CLK_TCK")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    line = f"42 (redis server) S 1 1 1 0 -1 0 0 0 0 0 {3 * clk} {clk} 0 0 20 0 1 0"
    assert _bench().proc_cpu_s(line) == 4.0


def test_calls_delta_counts_new_calls_and_leaves_the_probes_out() -> None:
    before = {"cmdstat_hset": {"calls": 10}, "cmdstat_info": {"calls": 3}}
    after = {
        "cmdstat_hset": {"calls": 25},
        "cmdstat_zadd": {"calls": 40},
        "cmdstat_info": {"calls": 9},
        "cmdstat_get": {"calls": 0},
    }
    delta = _bench().calls_delta(before, after)
    assert delta == {"zadd": 40, "hset": 15}
    assert list(delta) == ["zadd", "hset"]  # largest first


def test_per_scales_and_guards_zero() -> None:
    per = _bench().per
    assert per(1.5, 10_000, 1e6) == 150.0
    assert per(3.0, 0) is None
