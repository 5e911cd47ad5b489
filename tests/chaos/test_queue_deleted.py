"""A machine queue deleted under its consumer (RabbitMQ cancels the consumer): the queue is
declared again, with its binding, and consuming resumes, so later assignments arrive. The
assignment lost with the queue is the sweeper's (``requeue_unstarted``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from tests.support.processes import cleanup, eventually, new_settings

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]


async def test_a_deleted_machine_queue_is_declared_again_and_consumed() -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    amqp = Amqp(url, names)
    received: list[bytes] = []

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        received.extend(d.body for d in batch)
        return [Ack() for _ in batch]

    try:
        await amqp.connect()
        await amqp.ensure_machine_queue("m1")
        task = await amqp.consume(names.machine_queue("m1"), handler, batch_size=10)
        await amqp.publish_json("machines", "m1", b"before", kind="assign")
        await eventually(lambda: received == [b"before"], timeout=10)
        other = await aio_pika.connect(url)
        async with other:
            channel = await other.channel()
            await channel.queue_delete(names.machine_queue("m1"))

        async def delivered_after() -> bool:
            try:
                await asyncio.wait_for(
                    amqp.publish_json("machines", "m1", b"after", kind="assign"), timeout=2
                )
            except Exception:
                return False
            await asyncio.sleep(0.5)
            return b"after" in received

        await eventually(delivered_after, timeout=40, interval=0.5)
        task.cancel()
    finally:
        await amqp.close()
        await cleanup(settings, machine_ids=["m1"])
