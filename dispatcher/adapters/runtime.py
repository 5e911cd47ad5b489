"""The composition root: builds connections, stores and services from the settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from dispatcher.adapters.amqp import Amqp
from dispatcher.adapters.fleet_store import FleetStore
from dispatcher.adapters.machine_store import MachineStore
from dispatcher.adapters.redis_store import RunStore
from dispatcher.names import Names
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Live connections and the stores on top of them."""

    settings: Settings
    names: Names
    redis: aioredis.Redis
    amqp: Amqp
    runs: RunStore
    fleet: FleetStore
    machines: MachineStore


def make_redis(settings: Settings) -> aioredis.Redis:
    # A blocking pool: a burst of concurrent commands waits for a connection instead of failing.
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


# A service (dispatcher, worker) starting while Redis or RabbitMQ restarts waits this long.
STARTUP_WAIT_S = 120.0
UNREACHABLE = (
    OSError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    aio_pika.exceptions.AMQPConnectionError,
)


async def _connect(redis: aioredis.Redis, broker: Amqp | None, wait_s: float) -> None:
    """Reach Redis (and RabbitMQ); keep trying for ``wait_s`` seconds before giving up."""
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            await redis.ping()
            if broker is not None:
                await broker.connect()
            return
        except UNREACHABLE as exc:
            if broker is not None:
                await broker.close()
            if time.monotonic() + delay > deadline:
                raise
            log.warning("cannot reach Redis or RabbitMQ yet, retrying in %.1f s: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@contextlib.asynccontextmanager
async def runtime(
    settings: Settings, *, amqp: bool = True, wait_s: float = 0.0
) -> AsyncIterator[Runtime]:
    """Connect to Redis (and RabbitMQ unless ``amqp`` is False); close both on exit.

    ``wait_s``: how long to keep trying while they cannot be reached (a service starting
    during a Redis restart waits for it; a CLI command fails at once).
    """
    names = Names(settings.namespace)
    redis = make_redis(settings)
    broker = Amqp(settings.amqp_url.get_secret_value(), names, prefetch=settings.prefetch)
    try:
        await _connect(redis, broker if amqp else None, wait_s)
        yield Runtime(
            settings=settings,
            names=names,
            redis=redis,
            amqp=broker,
            runs=RunStore(redis, names, settings.retention_s),
            fleet=FleetStore(redis, names),
            machines=MachineStore(redis, names),
        )
    finally:
        await broker.close()
        await redis.aclose()


async def purge_namespace(settings: Settings, machine_ids: list[str]) -> int:
    """Delete every Redis key and AMQP queue and exchange of the namespace (demos, tests,
    benchmarks). Returns how many Redis keys were deleted."""
    names = Names(settings.namespace)
    redis = make_redis(settings)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=names.pattern(), count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.delete(*batch)
                batch = []
        if batch:
            deleted += await redis.delete(*batch)
    finally:
        await redis.aclose()
    queues = [
        names.requests_queue,
        names.dead_queue,
        names.heartbeats_queue,
        names.signals_queue,
        *(names.machine_queue(m) for m in machine_ids),
    ]
    exchanges = [
        names.requests_exchange,
        names.events_exchange,
        names.dead_exchange,
        names.machines_exchange,
        names.heartbeats_exchange,
    ]
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    return deleted
