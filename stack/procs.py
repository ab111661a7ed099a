"""Child processes of the local stack: started in their own process group, tied to the
parent's life (PR_SET_PDEATHSIG on Linux), stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


_LOWEST_PORT = 10_000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; else the default)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, outside the ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which is
    also where every outgoing connection gets its local port; between this call and the
    server's own bind, a client connection (a Kafka client of another service, say) can
    take it — seen as "Address already in use" from an aggregator's metrics server. Ports
    below the range are never used for outgoing connections, so only another listener can
    collide, and the bind below checks for that.
    """
    lo, _ = ephemeral_range()
    rng = random.SystemRandom()
    if lo - _LOWEST_PORT >= 1_000:
        for _ in range(200):
            port = rng.randrange(_LOWEST_PORT, lo)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no usable range
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None

    def pre() -> None:
        os.setsid()
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return pre


class ManagedProcess:
    """A server process with a log file; ``stop()`` is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        detach: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.detach = detach
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.detach,
                preexec_fn=None if self.detach else _die_with_parent(),
            )
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        kill_tree(self.proc.pid, timeout=timeout)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1.0)
        self.proc = None


def kill_tree(pid: int, *, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``pid`` (or the pid), then SIGKILL after ``timeout``."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    own = os.getpgid(0)

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid != own:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    send(signal.SIGKILL)
    for _ in range(100):
        if not pid_alive(pid):
            return
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        # reap if it is our child
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


class ProcessServer:
    """A local server run as one `ManagedProcess` on a free loopback port.

    Subclasses set ``impl``, write their config and call ``_launch`` from ``start()``.
    """

    impl = ""
    detach = False
    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: ManagedProcess | None = None

    def _launch(self, argv: Sequence[str], log_name: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / log_name
        self.proc = ManagedProcess(self.impl, argv, log_path=log_path, detach=self.detach)
        self.proc.start()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.pid else []
