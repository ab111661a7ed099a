"""A Redis lock (SET NX PX, released by its token) so one selector passes at a time."""

from __future__ import annotations

import secrets
from typing import Any

from redis.asyncio import Redis

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLock:
    def __init__(self, redis: Redis, key: str) -> None:
        self._r: Redis = redis
        self._key = key
        self._unlock: Any = redis.register_script(_UNLOCK)

    async def acquire(self, ttl_ms: int) -> str | None:
        """A token if the lock was free (held for ``ttl_ms`` at most), else None."""
        token = secrets.token_hex(8)
        return token if await self._r.set(self._key, token, nx=True, px=ttl_ms) else None

    async def release(self, token: str) -> None:
        await self._unlock(keys=[self._key], args=[token])
