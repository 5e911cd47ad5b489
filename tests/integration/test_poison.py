"""The consumer's verdicts on the real broker: acked batches (one multiple ack), a message the
handler dead-letters (copied with its reason), and a poison message the handler keeps handing
back (``Retry``): RabbitMQ's delivery limit dead-letters it, and nothing else is lost or
handled twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.amqp.consumer import REASON_HEADER
from dispatcher.adapters.amqp.topology import DELIVERY_LIMIT
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.ports import Ack, DeadLetter, Delivery, Retry, Verdict
from tests.support.processes import cleanup, eventually, new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

GOOD = 40


@pytest.fixture
async def amqp() -> AsyncIterator[tuple[Settings, Amqp]]:
    settings = new_settings()
    broker = Amqp(settings.amqp_url.get_secret_value(), Names(settings.namespace))
    await broker.connect()
    try:
        yield settings, broker
    finally:
        await broker.close()
        await cleanup(settings)


async def queue_state(settings: Settings, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The messages of ``queue`` (taken: the test is over when it reads them)."""
    taken = []
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    return taken


async def test_acks_dead_letters_and_the_delivery_limit(amqp: tuple[Settings, Amqp]) -> None:
    settings, broker = amqp
    names = Names(settings.namespace)
    seen: Counter[bytes] = Counter()

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for message in batch:
            seen[message.body] += 1
            if message.body == b"poison":
                verdicts.append(Retry("the handler cannot take it (yet)"))
            elif message.body == b"bad":
                verdicts.append(DeadLetter("not a request: test", "schema"))
            else:
                verdicts.append(Ack())
        return verdicts

    bodies = [f"good-{i}".encode() for i in range(GOOD)]
    bodies[GOOD // 2 : GOOD // 2] = [b"poison", b"bad"]
    for body in bodies:
        await broker.publish_json("requests", "submit", body, kind="submit")
    task = await broker.consume(names.requests_queue, handler, batch_size=16)
    try:
        await eventually(
            lambda: (
                all(seen[b] == 1 for b in bodies if b.startswith(b"good"))
                and seen[b"poison"] > DELIVERY_LIMIT
            ),
            timeout=60,
        )

        async def dead_lettered() -> list[aio_pika.abc.AbstractIncomingMessage] | None:
            messages = await queue_state(settings, names.dead_queue)
            dead.extend(messages)
            return dead if len(dead) >= 2 else None

        dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        await eventually(dead_lettered, timeout=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Every good message handled once: acked (in batches), never redelivered.
    assert all(seen[b] == 1 for b in bodies if b.startswith(b"good")), seen
    assert seen[b"bad"] == 1
    # The poison was handed back until RabbitMQ's delivery limit dead-lettered it.
    assert seen[b"poison"] == DELIVERY_LIMIT + 1
    by_body = {m.body: m for m in dead}
    assert sorted(by_body) == [b"bad", b"poison"]
    assert (by_body[b"bad"].headers or {})[REASON_HEADER] == "not a request: test"
    poison_headers = by_body[b"poison"].headers or {}
    assert poison_headers.get("x-first-death-reason") == "delivery_limit"
    assert poison_headers.get("x-first-death-queue") == names.requests_queue
    assert await queue_state(settings, names.requests_queue) == []
