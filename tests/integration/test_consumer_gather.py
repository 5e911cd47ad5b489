"""A consumer that gathers (``gather_s``, the heartbeats'): after a batch's first delivery it
waits for more, so deliveries that arrive meanwhile are handled in the same batch; without it
the first delivery is handled alone. On the real RabbitMQ, through the broker adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from tests.support.processes import cleanup, eventually, new_settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("gather_s", "first_batch"), [(0.0, 1), (2.0, 21)])
async def test_a_gathering_consumer_handles_what_arrives_meanwhile_in_one_batch(
    gather_s: float, first_batch: int
) -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    queue_name = f"{names.ns}.gather"
    amqp = Amqp(url, names)
    batches: list[list[bytes]] = []

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        batches.append([d.body for d in batch])
        return [Ack() for _ in batch]

    other = await aio_pika.connect(url)
    try:
        channel = await other.channel()
        await channel.declare_queue(queue_name, durable=True)
        await amqp.connect()
        await amqp.consume(queue_name, handler, batch_size=100, gather_s=gather_s)
        await channel.default_exchange.publish(aio_pika.Message(b"0"), routing_key=queue_name)
        await asyncio.sleep(0.5)  # the first delivery is in hand (and, gathering, waits)
        for i in range(1, 21):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=queue_name
            )
        await eventually(lambda: sum(len(b) for b in batches) == 21, timeout=10)
        assert len(batches[0]) == first_batch
        assert [body for batch in batches for body in batch] == [str(i).encode() for i in range(21)]
    finally:
        await amqp.close()
        await channel.queue_delete(queue_name)
        await other.close()
        await cleanup(settings)
