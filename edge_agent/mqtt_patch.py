"""Make aiomqtt's socket callbacks safe for thousands of clients in one event loop.

aiomqtt 2.5 schedules ``loop.add_reader/add_writer(fd, ...)`` with
``call_soon_threadsafe`` and never removes the writer when paho closes the socket. When
many clients in one process lose their connections at once (a reconnect storm), a
scheduled ``add_writer`` can run after its socket was closed and its fd number was
reused by another client's new socket: that client's writer callback is replaced and its
publishes stall (uvloop also logs ``Bad file descriptor``). The patch registers a
callback only if the socket is still the client's current one, and removes both reader
and writer on close. It patches aiomqtt's private socket callbacks, so it lives here,
next to ``MqttLink``, the adapter of that library. Applied by ``sim.worker`` only
(``apply()``); one device per process (the real agent) does not hit the race in the same
way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiomqtt

MISC_PERIOD_S = 5.0


def _current(client: Any, sock: Any, fd: int) -> bool:
    cur: Any = getattr(client, "_sock", None)
    if cur is None or cur is not sock:
        return False
    return bool(cur.fileno() == fd)


def _on_socket_open(self: Any, client: Any, userdata: Any, sock: Any) -> None:
    fd = sock.fileno()

    def callback() -> None:
        try:
            while True:
                client.loop_read()
                pending = getattr(client._sock, "pending", None)
                if pending is not None and pending() > 0:
                    continue
                break
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def register() -> None:
        if _current(client, sock, fd):
            self._loop.add_reader(fd, callback)
            self._misc_task = self._loop.create_task(_misc_loop(client))

    self._loop.call_soon_threadsafe(register)


async def _misc_loop(client: Any) -> None:
    """paho's housekeeping (keep-alive PINGREQ, timeouts): aiomqtt runs it every second
    per client, i.e. 10,000 wake-ups/s for 10,000 agents; every ``MISC_PERIOD_S`` is
    enough for keep-alives of 30 s and more."""
    import paho.mqtt.client as mqtt

    while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
        await asyncio.sleep(MISC_PERIOD_S)


def _on_socket_close(self: Any, client: Any, userdata: Any, sock: Any) -> None:
    fd = sock.fileno()
    if fd > -1:
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
    if self._misc_task is not None and not self._misc_task.done():
        self._loop.call_soon_threadsafe(self._misc_task.cancel)


def _on_socket_register_write(self: Any, client: Any, userdata: Any, sock: Any) -> None:
    fd = sock.fileno()

    def callback() -> None:
        try:
            client.loop_write()
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def register() -> None:
        if _current(client, sock, fd):
            self._loop.add_writer(fd, callback)

    self._loop.call_soon_threadsafe(register)


def _on_socket_unregister_write(self: Any, client: Any, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(ValueError, OSError):
        self._loop.remove_writer(sock.fileno())


def apply() -> None:
    cls: Any = aiomqtt.Client
    cls._on_socket_open = _on_socket_open
    cls._on_socket_close = _on_socket_close
    cls._on_socket_register_write = _on_socket_register_write
    cls._on_socket_unregister_write = _on_socket_unregister_write
