"""The secure broker for tests: Mosquitto with the dynamic-security plugin or its password
file, or a skip (a failure under ``FEDFLEET_REQUIRE_REAL=1``, as CI runs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.mqtt import Mosquitto, dynsec_plugin, mosquitto_binary


def require_dynsec() -> None:
    """Skip the test when Mosquitto 2 with its dynamic-security plugin is missing."""
    if mosquitto_binary() is None or dynsec_plugin() is None:
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail("FEDFLEET_REQUIRE_REAL=1 but mosquitto/dynsec is not installed")
        pytest.skip("mosquitto 2 with the dynamic-security plugin is not installed")


@contextlib.contextmanager
def secure_mosquitto(workdir: Path, auth: str = "dynsec") -> Iterator[Mosquitto]:
    """A started, ready ``Mosquitto(secure=True, auth=auth)`` below ``workdir``; stopped
    on exit."""
    require_dynsec()
    server = Mosquitto(workdir, secure=True, auth=auth)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
