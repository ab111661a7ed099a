"""``BrokerAdmin`` on Mosquitto's password file: enrolment that scales to a large fleet.

The dynamic-security plugin rewrites its whole JSON file on every command, so enrolling
the n-th device costs O(n) and a fleet O(n^2) (BENCHMARKS.md, "Enrolment cost"). Here
the coordinator owns the broker's ``password_file`` (``schemas.passwd``; the ACL file is
static, ``%u`` patterns) and changes it in batches: every enrolment and revocation that
arrives while one batch is being applied joins the next; a batch is one read, one atomic
write, one SIGHUP to the broker (its pid from ``pid_file``) and a probe that confirms
the reload. Several brokers sharing the file (``schemas.brokers``: a fleet spread over
them) are all signalled (one pid per line of ``pid_file``) and each one's reload probed.
A call returns once the broker runs a file holding its change, so a device
told its password can connect at once, and a revoked one is already cut off (Mosquitto
disconnects the live sessions of a user that a reload removed).

Several coordinators may share the file: a batch holds an ``flock`` on
``<password_file>.lock`` from its read to the confirmed reload, and re-reads the file, so
their changes never overwrite each other. The coordinator needs to signal the broker
(same host, or a shared process namespace in a pod): docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import aiomqtt

from schemas import dynsec, passwd
from schemas.atomic import atomic_write
from schemas.dynsec import DynsecError
from schemas.mqtt_auth import tls_context

log = logging.getLogger(__name__)

Change = tuple[str, str | None]  # device id, hash field (None: remove)


class PasswdBrokerAdmin:
    """``BrokerAdmin`` that writes ``passwd_file`` and makes the broker (pid in
    ``pid_file``, reachable at ``host``:``port``, TLS against ``cafile`` when given)
    reload it; failures are ``DynsecError`` (the port's error)."""

    def __init__(
        self, passwd_file: Path, pid_file: Path, host: str, port: int,
        cafile: Path | None = None, *, timeout: float = 15.0, linger_s: float = 0.01,
        brokers: Sequence[tuple[str, int]] = (),
    ) -> None:  # fmt: skip
        """``brokers``: every broker that loads the file (default: ``host``:``port``);
        ``pid_file`` then holds one pid per line, and each broker is signalled and its
        reload confirmed before a call returns."""
        self.passwd_file, self.pid_file = Path(passwd_file), Path(pid_file)
        self.host, self.port, self.cafile = host, port, cafile
        self.brokers = list(brokers) or [(host, port)]
        self.timeout, self.linger_s = timeout, linger_s
        self._pending: list[tuple[str, str | None, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # reloads made (for the benchmark and tests)

    async def __aenter__(self) -> PasswdBrokerAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_exception(DynsecError("passwd: the coordinator is stopping"))
        self._pending.clear()

    # ------------------------------------------------------------------ the port

    async def enrol(self, device_id: str, password: str) -> None:
        dynsec.check_device_id(device_id)
        await self._submit(device_id, passwd.hash_field(password))

    async def revoke(self, device_id: str) -> None:
        await self._submit(dynsec.check_device_id(device_id), None)

    async def has_client(self, device_id: str) -> bool:
        dynsec.check_device_id(device_id)
        return device_id in await asyncio.to_thread(self._read)

    # ------------------------------------------------------------------ batching

    async def _submit(self, device_id: str, field: str | None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((device_id, field, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="passwd-batches")
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger_s > 0:
                await asyncio.sleep(self.linger_s)  # let concurrent calls join the batch
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self._apply([(d, f) for d, f, _ in batch])
            except Exception as exc:  # every caller of the batch learns why
                err = exc if isinstance(exc, DynsecError) else DynsecError(f"passwd: {exc}")
                log.warning("broker password file: batch of %d failed: %s", len(batch), err)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            else:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def _apply(self, changes: list[Change]) -> None:
        lock_fd = await asyncio.to_thread(self._lock)
        try:
            entries = await asyncio.to_thread(self._read)
            # a new password for an id the broker knows: remove it first, so the reload
            # cuts the sessions of the old credential (as a revocation would)
            replaced = [d for d, f in changes if f is not None and d in entries]
            if replaced:
                passwd.apply(entries, [(d, None) for d in replaced])
                await self._publish(entries)
            passwd.apply(entries, changes)
            await self._publish(entries)
            self.batches += 1
        finally:
            os.close(lock_fd)  # releases the flock

    async def _publish(self, entries: dict[str, str]) -> None:
        """Write ``entries`` with a new probe password, signal, wait for the reload."""
        probe = dynsec.new_password()
        entries[passwd.PROBE_USER] = passwd.hash_field(probe)
        await asyncio.to_thread(self._write_and_signal, passwd.render(entries))
        await asyncio.gather(*(self._confirm(probe, h, p) for h, p in self.brokers))

    # ------------------------------------------------------------------ file and broker

    def _lock(self) -> int:
        path = self.passwd_file.with_name(self.passwd_file.name + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DynsecError(f"passwd: cannot open {path}: {exc}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read(self) -> dict[str, str]:
        try:
            return passwd.parse(self.passwd_file.read_text())
        except OSError as exc:
            raise DynsecError(f"passwd: cannot read {self.passwd_file}: {exc}") from None

    def _write_and_signal(self, data: bytes) -> None:
        try:
            atomic_write(self.passwd_file, data, mode=0o600)
            pids = [int(p) for p in self.pid_file.read_text().split()]
        except (OSError, ValueError) as exc:
            raise DynsecError(f"passwd: cannot update the broker's files: {exc}") from None
        if not pids:
            raise DynsecError(f"passwd: no broker pid in {self.pid_file}")
        for pid in pids:  # every broker loading the file (one pid per line)
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError as exc:
                raise DynsecError(f"passwd: cannot signal the broker (pid {pid}): "
                                  f"{exc}") from None  # fmt: skip

    async def _confirm(self, probe: str, host: str, port: int) -> None:
        """Return once the broker at ``host``:``port`` accepts the probe's new password
        (it has reloaded)."""
        tls = tls_context(self.cafile) if self.cafile is not None else None
        deadline = time.monotonic() + self.timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                async with aiomqtt.Client(host, port, identifier="",
                                          username=passwd.PROBE_USER, password=probe,
                                          tls_context=tls, timeout=5):  # fmt: skip
                    return
            except aiomqtt.MqttError as exc:
                last = str(exc)
            await asyncio.sleep(0.01)
        raise DynsecError(
            f"passwd: the broker at {host}:{port} did not load the new password "
            f"file within {self.timeout:g}s ({last})"
        )
