"""The AMQP topology on the real RabbitMQ: what the contract declares, and upgrades."""

from __future__ import annotations

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.processes import (
    cleanup,
)

pytestmark = pytest.mark.integration


async def test_signals_queue_declared_by_an_older_version_is_recreated(
    settings: Settings,
) -> None:
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            names.signals_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        broker = Amqp(url, names)
        await broker.connect()  # PRECONDITION_FAILED here without the re-creation
        await broker.close()
        # The queue is the classic one now: a classic declaration is accepted (a quorum
        # queue would refuse it with PRECONDITION_FAILED).
        channel = await connection.channel()
        await channel.declare_queue(
            names.signals_queue, durable=True, arguments={"x-message-ttl": 60_000}
        )
    finally:
        await connection.close()
        await cleanup(settings)
