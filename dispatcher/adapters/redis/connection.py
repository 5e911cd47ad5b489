"""The Redis client every process uses, and the translation of its connection failures into
the error tree (``StoreUnavailable``), so that no caller needs to know redis-py's exceptions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from dispatcher.errors import StoreUnavailable
from dispatcher.names import Names
from dispatcher.settings import Settings

# The client type, for the composition root and the tools that hold one.
Redis = aioredis.Redis

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound=type)

# What "Redis cannot be reached" looks like from redis-py (refused, reset, timed out, no free
# connection in the pool, a server still loading its data).
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
)

# Replies of a Redis that is up but cannot take the command now: out of memory under
# ``noeviction``, a replica (read-only, or its primary is down), ``min-replicas-to-write`` not
# met, still loading its data set, busy with a script, a failed background save. Each is an
# outage of the store (hold the work and try again), never a sign that the item is bad.
OUTAGE_REPLIES = (
    "OOM",
    "READONLY",
    "NOREPLICAS",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "MISCONF",
    "TRYAGAIN",
    "CLUSTERDOWN",
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot serve now (unreachable, or an outage reply)."""
    if isinstance(exc, UNREACHABLE):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        # redis-py strips the error code for some of them (ReadOnlyError, OutOfMemoryError ...).
        if isinstance(
            exc,
            (
                redis_errors.ReadOnlyError,
                redis_errors.OutOfMemoryError,
                redis_errors.MasterDownError,
                redis_errors.TryAgainError,
                redis_errors.ClusterDownError,
            ),
        ):
            return True
        text = str(exc).lstrip()
        return any(
            text.startswith(word) and text[len(word) : len(word) + 1] in ("", " ")
            for word in OUTAGE_REPLIES
        )
    return False


def outage_of(exc: BaseException) -> StoreUnavailable:
    """The ``StoreUnavailable`` for an outage reply or a connection failure."""
    return StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")


def make_redis(settings: Settings) -> aioredis.Redis:
    """The client of one process: a blocking pool, so that a burst of concurrent commands
    waits for a connection instead of failing. With Sentinels configured, the client of the
    service's primary, following failovers (:mod:`.sentinel`)."""
    if settings.redis_sentinels:
        from dispatcher.adapters.redis.sentinel import sentinel_redis

        return sentinel_redis(
            settings.redis_sentinels,
            settings.redis_sentinel_service,
            settings.redis_url.get_secret_value(),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry_on_timeout=True,
        max_connections=64,
        timeout=30,
    )
    return aioredis.Redis.from_pool(pool)


def store_call(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """``method`` raising ``StoreUnavailable`` where redis-py says Redis cannot be reached or
    cannot serve now (an outage reply, see :data:`OUTAGE_REPLIES`)."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except StoreUnavailable:
            raise
        except redis_errors.RedisError as exc:
            if is_outage(exc):
                raise outage_of(exc) from exc
            raise
        except UNREACHABLE as exc:
            raise outage_of(exc) from exc

    return call


def store_adapter(cls: C) -> C:
    """Apply :func:`store_call` to every public coroutine method of an adapter class."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, store_call(member))
    return cls


@store_call
async def ping(redis: aioredis.Redis) -> None:
    """Reach Redis once (``StoreUnavailable`` if it does not answer)."""
    await redis.ping()


@store_call
async def delete_namespace(redis: aioredis.Redis, names: Names) -> int:
    """Delete every key of the namespace (demos, tests, benchmarks); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=names.pattern(), count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await redis.delete(*batch)
            batch = []
    if batch:
        deleted += await redis.delete(*batch)
    return deleted
