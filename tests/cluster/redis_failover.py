"""The Redis client the product would build from Sentinel settings, with what redis-py lacks.

``redis.asyncio.sentinel.Sentinel.master_for`` finds the primary through the Sentinels when a
connection is *first* made from the pool. A command that fails and is retried reconnects the
same connection object, and redis-py 8.1 then connects to the address it had, the old primary,
again and again (redis/redis-py#3874, open; #3560 for the connect retries): after a failover
every retry reaches the demoted server, answers READONLY and the command fails once the retries
are spent. ``FollowingSentinelConnection`` asks the Sentinels before every socket connection
instead. ``test_redis_sentinel.py`` shows the stock class failing and this one passing.

``SentinelBlockingConnectionPool`` is the Sentinel pool with the waiting behaviour of the
product's ``BlockingConnectionPool`` (a burst waits for a connection instead of failing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from dispatcher.adapters.redis.sentinel import (
    FollowingSentinelConnection,
    SentinelBlockingConnectionPool,
)


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service: str,
    *,
    following: bool = True,
    retries: int = 60,
    max_connections: int = 64,
    **connection_kwargs: Any,
) -> tuple[Sentinel, aioredis.Redis]:
    """The Sentinel manager and a client of the service's primary, with commands retried on
    connection errors and time-outs (a retry reconnects; with ``following`` the reconnection
    asks the Sentinels again). A primary demoted under a connection answers READONLY, which
    redis-py's Sentinel connection turns into a connection error: retried as well."""
    sentinel = Sentinel(sentinels, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    kwargs: dict[str, Any] = {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=retries),
        "retry_on_error": [redis_errors.ConnectionError, redis_errors.TimeoutError],
        "max_connections": max_connections,
        "timeout": 30,  # how long a command waits for a free connection
        **connection_kwargs,
    }
    if following:
        kwargs["connection_class"] = FollowingSentinelConnection
    client = sentinel.master_for(
        service, connection_pool_class=SentinelBlockingConnectionPool, **kwargs
    )
    return sentinel, client
