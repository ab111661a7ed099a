"""How long a task's record stays in Redis: ``CoordinatorSettings.task_record_ttl_s``
(most of Redis's bytes in a large fleet, docs/scaling.md)."""

from __future__ import annotations

import pytest

from coordinator.keys import Keys
from coordinator.redis_client import redis_client
from coordinator.settings import CoordinatorSettings
from coordinator.tasks import TaskStore
from schemas.errors import SettingsError
from tests.test_coordinator_support import redis_url

__all__ = ["redis_url"]  # fixture


def test_the_record_ttl_must_outlive_the_lease() -> None:
    assert CoordinatorSettings().task_record_ttl_s == 7 * 86400
    with pytest.raises(SettingsError, match="task_record_ttl_s"):
        CoordinatorSettings(lease_s=600, task_record_ttl_s=300)


async def test_a_task_record_expires_after_the_configured_time(
    redis_url: str, unique_prefix: str
) -> None:
    r = redis_client(redis_url)
    try:
        for keep, want in ((None, 7 * 86400), (3600.0, 3600)):
            store = TaskStore(r, unique_prefix) if keep is None else TaskStore(
                r, unique_prefix, keep_s=keep)  # fmt: skip
            tid = f"t-{want}"
            await store.create(task_id=tid, job_id="j", device_id="d", token="tok",
                               issued_ts=1.0, deadline_ts=2.0)  # fmt: skip
            ttl = await r.ttl(Keys(unique_prefix).task(tid))
            assert want - 5 <= ttl <= want, (keep, ttl)
    finally:
        await r.aclose()
