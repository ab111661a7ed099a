"""A small asyncio TCP proxy: a front address for several backends, with injectable delay.

``TcpProxy(backends)`` listens on 127.0.0.1 (a free port) and forwards each connection to
the first backend that accepts it, starting from the next one in turn (round robin with
fail-over: a dead backend costs a refused or timed-out connect, then the next is tried).
``delay_s`` holds every chunk that long in each direction before forwarding it: a slow
link in user space, for machines whose kernel lacks ``netem``. Set it any time; it applies
to data read from then on. ``start()``/``stop()`` are idempotent; ``async with`` works.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from stack.errors import StackError
from stack.procs import free_port


class TcpProxy:
    def __init__(self, backends: Sequence[tuple[str, int]], *, host: str = "127.0.0.1",
                 port: int | None = None, connect_timeout_s: float = 2.0) -> None:  # fmt: skip
        if not backends:
            raise StackError("proxy: no backends")
        self.backends = list(backends)
        self.host = host
        self.port = port or free_port()
        self.connect_timeout_s = connect_timeout_s
        self.delay_s = 0.0
        self.connections = 0
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> TcpProxy:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        n = len(self.backends)
        start, self._next = self._next, (self._next + 1) % n
        for k in range(n):
            host, port = self.backends[(start + k) % n]
            with contextlib.suppress(OSError, TimeoutError):
                return await asyncio.wait_for(
                    asyncio.open_connection(host, port), self.connect_timeout_s
                )
        return None

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up = await self._connect()
            if up is None:
                return
            ur, uw = up
            self.connections += 1
            pipes = {asyncio.create_task(self._pipe(cr, uw)),
                     asyncio.create_task(self._pipe(ur, cw))}  # fmt: skip
            try:
                while pipes:
                    done, pipes = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                    if not all(t.result() for t in done):  # a reset: tear both down
                        break
            finally:
                for t in pipes:
                    t.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                uw.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            cw.close()
            self._tasks.discard(task)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        """Copy ``r`` to ``w``, each chunk ``delay_s`` after it arrived (in order); True on
        a clean end of stream (passed on as a half-close), False on an error."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()

        sender = asyncio.create_task(send())
        try:
            while not sender.done():
                data = await r.read(65536)
                queue.put_nowait((time.monotonic() + self.delay_s, data))
                if not data:
                    break
            await sender
            return True
        except OSError:
            return False
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
