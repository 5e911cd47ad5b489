"""A machine worker's connection (RabbitMQ only) and its readiness, for ``workers.cli``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.bootstrap import CONNECT_BACKOFF
from dispatcher.errors import Unavailable
from dispatcher.metrics.health import Readiness, ReadyCheck
from dispatcher.names import Names
from dispatcher.retry import retry
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def worker_broker(settings: Settings, *, wait_s: float = 0.0) -> AsyncIterator[Amqp]:
    """A machine worker's only connection: RabbitMQ, with the topology looked up, not declared
    (its identity may configure nothing). No Redis: the dispatcher records for it."""
    names = Names(settings.namespace)
    broker = Amqp(
        settings.amqp_url.get_secret_value(), names, prefetch=settings.prefetch, declare=False
    )

    async def once() -> None:
        try:
            await broker.connect()
        except Unavailable:
            await broker.close()
            raise

    try:
        await retry(
            once,
            retry_on=Unavailable,
            backoff=CONNECT_BACKOFF,
            deadline=time.monotonic() + wait_s,
            on_retry=lambda exc, delay: log.warning(
                "cannot reach RabbitMQ yet, retrying in %.1f s: %s", delay, exc
            ),
        )
        yield broker
    finally:
        await broker.close()


def worker_readiness(broker: Amqp, consuming: Callable[[], bool]) -> ReadyCheck:
    """A machine worker is ready when its RabbitMQ connection is up and it consumes (it has no
    Redis)."""

    async def check() -> Readiness:
        if not broker.is_connected():
            return Readiness(False, "RabbitMQ is unreachable")
        if not consuming() or not broker.consuming():
            return Readiness(False, "consumers are not running")
        return Readiness(True)

    return check
