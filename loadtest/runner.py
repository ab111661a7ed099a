"""What every scenario shares: the stack + services environment, a progress display on
stderr, a timeline of samples, and per-process resource readings."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from sim.load_services import Api, LoadServices
from sim.worker import rss_mb
from stack import LocalStack, StackInfo, StackSettings

_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (``/proc/pid/stat``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return 0.0


class ProcWatch:
    """RSS (peak) and CPU share of named processes between ``start()`` and ``read()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def sample(self) -> None:
        for n, p in self.pids.items():
            self.peak[n] = max(self.peak[n], rss_mb(p))

    def read(self) -> dict[str, dict[str, float]]:
        self.sample()
        dt = max(1e-6, time.monotonic() - self._t0)
        return {
            n: {"rss_mb_peak": round(self.peak[n], 1),
                "cpu_share": round((cpu_seconds(p) - self._cpu0.get(n, 0.0)) / dt, 3)}
            for n, p in self.pids.items()
        }  # fmt: skip


class Progress:
    """A rich progress bar on stderr (a plain line every 5 s when stderr is no terminal)."""

    def __init__(self, title: str, total: float, *, quiet: bool = False) -> None:
        self.title = title
        self.total = total
        self.quiet = quiet
        self._p: Any = None
        self._task: Any = None
        self._last = 0.0

    def __enter__(self) -> Progress:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=sys.stderr)
        if console.is_terminal and not self.quiet:
            self._p = RichProgress(
                TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=console,
            )  # fmt: skip
            self._p.start()
            self._task = self._p.add_task(self.title, total=self.total, info="")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.stop()

    def update(self, done: float, info: str, phase: str | None = None) -> None:
        if self._p is not None:
            kw: dict[str, Any] = {"completed": min(done, self.total), "info": info}
            if phase:
                kw["description"] = phase
            self._p.update(self._task, **kw)
            return
        now = time.monotonic()
        if now - self._last >= 5.0:
            self._last = now
            print(f"[loadtest] {phase or self.title}: {info}", file=sys.stderr, flush=True)


@dataclass
class Timeline:
    """Rows of samples ``{"t": seconds since start, ...}``."""

    t0: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **values: Any) -> dict[str, Any]:
        row = {"t": round(time.monotonic() - self.t0, 3), **values}
        self.rows.append(row)
        return row


@dataclass
class Env:
    info: StackInfo
    services: LoadServices
    http: httpx.AsyncClient
    api: Api
    workdir: Path
    run_id: str
    launcher: LocalStack


@asynccontextmanager
async def environment(
    stack_settings: StackSettings,
    *,
    aggregators: int,
    coordinator_args: tuple[str, ...] = (),
    aggregator_args: tuple[str, ...] = (),
    log: Any = None,
) -> AsyncIterator[Env]:
    """Stack (embedded or external) + coordinator + aggregators, isolated by a fresh
    topic/Redis prefix so runs may share servers."""
    run_id = uuid.uuid4().hex[:6]
    async with AsyncExitStack() as stack:
        launcher = LocalStack(stack_settings, log=log)
        info: StackInfo = await stack.enter_async_context(launcher)
        if log is not None:
            for name, desc in info.describe().items():
                log(f"{name}: {desc}")
        workdir = Path(tempfile.mkdtemp(prefix=f"fedfleet-loadtest-{run_id}-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # after services stop
        services = LoadServices(
            info, workdir, aggregators=aggregators, topic_prefix=f"lt{run_id}.",
            coordinator_args=coordinator_args, aggregator_args=aggregator_args,
            aggregator_history_size=256,
            admin_token=f"lt-{uuid.uuid4().hex}",
        )  # fmt: skip
        stack.callback(services.stop)
        await services.start()
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=services.rest_url, timeout=30.0, verify=services.verify,
                              headers={"Authorization": f"Bearer {services.admin_token}"})
        )
        yield Env(info, services, http, Api(http, services.admin_token), workdir, run_id,
                  launcher)
