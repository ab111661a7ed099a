"""Shared fixtures: one real broker stack (Kafka KRaft, Mosquitto, Redis) per test session.

The stack is started by `stack.LocalStack` on free loopback ports and torn down at
the end of the session. With FEDFLEET_REQUIRE_REAL=1 (CI) a missing real server is an error;
otherwise a pip fallback may be used. Integration tests isolate themselves with unique topic
and key prefixes (`unique_prefix`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from stack import LocalStack, StackInfo, StackSettings

# Shared, loaded CI machines: correctness only, never per-example time limits.
settings.register_profile(
    "fedfleet", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fedfleet"))


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    heap = int(os.environ.get("FEDFLEET_KAFKA_HEAP_MB", "512"))
    settings = StackSettings.from_env(kafka_heap_mb=heap)
    launcher = LocalStack(settings, log=lambda m: print(f"[stack] {m}"))
    info = launcher.start()
    print(f"[stack] {info.describe()}")
    try:
        yield info
    finally:
        launcher.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A fresh prefix for Kafka topics / Redis keys / job ids, e.g. 't3f9a1c.'."""
    return f"t{uuid.uuid4().hex[:8]}."
