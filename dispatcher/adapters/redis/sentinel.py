"""Redis behind Sentinel: the client a process builds when ``RUNDISPATCH_REDIS_SENTINELS`` is
set, with what redis-py lacks.

``Sentinel.master_for`` finds the primary through the Sentinels when a connection is *first*
made. A command that fails and is retried reconnects the same connection object, and redis-py
8.1 then connects to the address it had, the old primary, again and again (redis/redis-py#3874):
after a failover every retry reaches the demoted server. :class:`FollowingSentinelConnection`
asks the Sentinels before every socket connection instead. The pool waits for a free
connection like the single-Redis pool. Proven against a real Sentinel group in
``tests/cluster``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff


class FollowingSentinelConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the Sentinels for the primary every time it
    opens a socket, so that a retried command follows a failover."""

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()  # type: ignore[no-untyped-call]


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel discovery with a bounded pool that waits when all connections are busy."""


class SentinelRedis(aioredis.Redis):
    """The primary's client, which also closes its connections to the Sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def parse_sentinels(setting: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as address pairs."""
    addresses = []
    for part in setting.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not a Sentinel address (host:port): {part.strip()!r}")
        addresses.append((host, int(port)))
    return addresses


def sentinel_redis(
    sentinels: str, service: str, redis_url: str, *, max_connections: int = 64
) -> aioredis.Redis:
    """A client of the service's primary; the password and database come from ``redis_url``.
    Commands are retried on connection errors and time-outs for about half a minute (a
    failover takes a few seconds); a retry asks the Sentinels for the primary again. A primary
    demoted under a connection answers READONLY, which redis-py's Sentinel connection turns
    into a connection error: retried as well."""
    url = urlparse(redis_url)
    auth: dict[str, Any] = {}
    if url.password:
        auth["password"] = unquote(url.password)
    if url.username:
        auth["username"] = unquote(url.username)
    database = int(url.path.strip("/") or 0) if url.path.strip("/").isdigit() else 0
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parse_sentinels(sentinels), socket_timeout=1.0, sentinel_kwargs=dict(auth)
    )
    client: SentinelRedis = sentinel.master_for(
        service,
        redis_class=SentinelRedis,
        connection_pool_class=SentinelBlockingConnectionPool,
        connection_class=FollowingSentinelConnection,
        db=database,
        socket_timeout=10.0,
        socket_connect_timeout=1.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=60),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        max_connections=max_connections,
        timeout=30,
        health_check_interval=10,
        **auth,
    )
    client.sentinel_manager = sentinel
    return client
