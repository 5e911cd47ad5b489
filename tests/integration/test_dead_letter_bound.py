"""The dead-letter queue is bounded (``RUNDISPATCH_DEAD_LETTER_MAX``): past the bound, the
oldest dead letters are dropped, on the real RabbitMQ; a dead-letter queue declared before it
had a bound is used as it is."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.processes import cleanup, eventually, new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    settings = new_settings(dead_letter_max=3)
    yield settings
    await cleanup(settings)


async def dead_letters(names: Names) -> list[bytes]:
    """The dead-letter queue's messages, oldest first (read and put back)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.dead_queue, passive=True)
        bodies = []
        while (message := await queue.get(fail=False, no_ack=False)) is not None:
            bodies.append(message.body)
        await channel.close()  # every message goes back, unacknowledged
        return bodies


async def queue_length(names: Names) -> int:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.dead_queue, passive=True)
        return queue.declaration_result.message_count or 0


async def test_the_dead_letter_queue_keeps_the_newest_up_to_its_bound(settings: Settings) -> None:
    names = Names(settings.namespace)
    broker = Amqp(URL, names, dead_letter_max=settings.dead_letter_max)
    await broker.connect()
    try:
        for index in range(5):
            await broker.publish_json("dead", "", f"dead-{index}".encode(), kind="test")
        await eventually(lambda: _length_is(names, 3), timeout=10)
        assert await dead_letters(names) == [b"dead-2", b"dead-3", b"dead-4"]
    finally:
        await broker.close()


async def test_an_unbounded_dead_letter_queue_of_an_earlier_version_is_used_as_it_is(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names(settings.namespace)
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            names.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
    broker = Amqp(URL, names, dead_letter_max=settings.dead_letter_max)
    await broker.connect()
    try:
        assert "exists with other arguments" in caplog.text
        for index in range(5):
            await broker.publish_json("dead", "", f"dead-{index}".encode(), kind="test")
        await eventually(lambda: _length_is(names, 5), timeout=10)
    finally:
        await broker.close()


async def _length_is(names: Names, expected: int) -> bool:
    return await queue_length(names) == expected
