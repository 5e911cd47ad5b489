"""An outage longer than the delivery limit x the hold loses nothing: a held delivery is
published again to its queue (a fresh copy, no delivery count) instead of being handed back,
so a Redis outage of any length never dead-letters accepted requests. Real RabbitMQ; the hold
is the ``outage_hold_s`` setting, short here."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.amqp.consumer import HELD_HEADER
from dispatcher.adapters.amqp.topology import DELIVERY_LIMIT
from dispatcher.core.principals import HELD_FOR_HEADER, admin_user_of
from dispatcher.errors import StoreUnavailable
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from tests.support.processes import cleanup, eventually, new_settings

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

HOLD_S = 0.2
MESSAGES = 5


async def test_an_outage_outlasting_the_delivery_limit_dead_letters_nothing() -> None:
    settings = new_settings(outage_hold_s=HOLD_S)
    names = Names(settings.namespace)
    outage_states: list[bool] = []
    amqp = Amqp(
        settings.amqp_url.get_secret_value(),
        names,
        hold_s=settings.outage_hold_s,
        on_outage=outage_states.append,
    )
    attempts = 0
    outage_over = asyncio.Event()
    handled: dict[bytes, int] = {}
    holds: list[int] = []
    publishers: set[tuple[str | None, object]] = set()

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        nonlocal attempts
        attempts += 1
        held = [int((d.headers or {}).get(HELD_HEADER, 0)) for d in batch]  # type: ignore[attr-defined]
        if not outage_over.is_set():
            holds.extend(held)
            raise StoreUnavailable("Redis is unavailable: OOM command not allowed")
        for delivery in batch:
            handled[delivery.body] = handled.get(delivery.body, 0) + 1
            publishers.add((delivery.user_id, delivery.headers.get(HELD_FOR_HEADER)))  # type: ignore[attr-defined]
        return [Ack() for _ in batch]

    try:
        await amqp.connect()
        for index in range(MESSAGES):
            await amqp.publish_json("requests", "submit", f"m{index}".encode(), kind="test")
        task = await amqp.consume(names.requests_queue, handler, batch_size=10)
        # Held and published again more often than the delivery limit allows redeliveries.
        await eventually(lambda: holds and min(holds[-MESSAGES:]) > DELIVERY_LIMIT, timeout=40)
        assert True in outage_states
        outage_over.set()
        await eventually(lambda: len(handled) == MESSAGES, timeout=30)
        task.cancel()
        assert sorted(handled) == sorted(f"m{i}".encode() for i in range(MESSAGES))
        assert set(handled.values()) == {1}
        # Still the dispatcher's messages: RabbitMQ took the copies' user_id, and each copy
        # names who published the message first.
        admin = admin_user_of(settings.amqp_url.get_secret_value())
        assert publishers == {(admin, admin)}
        assert outage_states[-1] is False
        dead = await amqp.publisher.declare_queue(names.dead_queue, passive=True)
        assert dead.declaration_result.message_count == 0
    finally:
        await amqp.close()
        await cleanup(settings)
