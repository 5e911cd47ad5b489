"""The AMQP adapter survives a cut connection: publishing and consuming resume by themselves.

A regression test for consumers that were never re-created after a reconnection (a queue
looked up with ``get_queue(ensure=False)`` is unknown to aio-pika's robust channel).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from tests.support.faultproxy import FaultProxy
from tests.support.processes import (
    cleanup,
    eventually,
    new_settings,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy("127.0.0.1", 5672)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.stop()


async def publish_until_confirmed(amqp: Amqp, body: bytes) -> None:
    """What every publisher of the product does with a failed publish: try again."""
    while True:
        try:
            await asyncio.wait_for(
                amqp.publish_json("requests", "submit", body, kind="test"), timeout=5
            )
            return
        except Exception:
            await asyncio.sleep(0.2)


async def test_consumer_and_publisher_resume_after_every_connection_is_reset(
    proxy: FaultProxy,
) -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    amqp = Amqp(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", names)
    await amqp.connect()
    received: list[bytes] = []

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        received.extend(m.body for m in batch)
        return [Ack() for _ in batch]

    consumer = await amqp.consume(names.requests_queue, handler, batch_size=10)
    try:
        for round_ in range(3):
            body = f"round-{round_}".encode()
            await publish_until_confirmed(amqp, body)
            await eventually(lambda body=body: body in received, timeout=30)  # type: ignore[misc]
            assert proxy.reset_all() >= 1
        await publish_until_confirmed(amqp, b"after")
        await eventually(lambda: b"after" in received, timeout=30)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await amqp.close()
        await cleanup(settings)
