"""The one place a Redis client is made from a ``redis_url`` (the coordinator, the load
tests and the test rigs all call :func:`redis_client`).

``redis://``, ``rediss://`` and ``unix://`` open a single Redis; ``redis+cluster://`` and
``rediss+cluster://`` (``host:port`` of any node; the others are discovered) open a
``redis.asyncio.RedisCluster``. Both answer the same commands, scripts and pipelines the
stores use: every multi-key script and ``MULTI`` keeps its keys in one hash slot
(``coordinator.keys``), and a cluster pipeline without a transaction may span slots.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain ``redis(s)://`` URL of a cluster URL; None for a single Redis."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return f"{plain}://{rest}" if plain else None


def redis_client(url: str, **kwargs: Any) -> Any:
    """A client for ``url`` with ``decode_responses=True`` (``kwargs`` override).

    After a Redis restart every pooled connection is dead: an idle one is checked with a
    PING before use (``health_check_interval``) and a command that finds its connection
    closed is sent once more on a new one, so a restart costs a retry instead of a 503 per
    stale connection. (A command is re-sent only on a connection error; the upload path's
    scripts are idempotent state transitions.) A cluster client also follows ``MOVED``
    and ``ASK`` redirections and refreshes its slot map when a node goes away."""
    opts: dict[str, Any] = {
        "decode_responses": True, "health_check_interval": 2,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }  # fmt: skip
    opts.update(kwargs)
    plain = cluster_url(url)
    if plain is not None:
        return RedisCluster.from_url(plain, **opts)
    return Redis.from_url(url, **opts)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)
