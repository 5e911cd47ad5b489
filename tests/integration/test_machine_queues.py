"""Declaring machines' queues on the real RabbitMQ through the broker adapter: many machines at
once over its declaring channels, each machine queue bound by machine id and each replies
queue by its key; a replies queue an operator declared otherwise is used as it is, and the
declarations after it go on (the refusal closed a declaring channel: another one is opened)."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.errors import BrokerUnavailable, ConfigurationError
from dispatcher.names import Names
from tests.support.processes import cleanup, connected_amqp, new_settings

pytestmark = pytest.mark.integration

MACHINES = [f"m{i}" for i in range(40)]


async def test_machines_declared_at_once_and_a_replies_queue_declared_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    amqp = Amqp(url, names, machine_queue_type="classic")
    other = await aio_pika.connect(url)
    try:
        await amqp.connect()
        channel = await other.channel()
        # An operator's replies queue for m7 without the product's arguments (no TTL).
        await channel.declare_queue(names.machine_replies_queue("m7"), durable=True)
        await asyncio.gather(*(amqp.ensure_machine_queue(m) for m in MACHINES))
        await amqp.ensure_machine_queue("m7")  # known: one declaration, no new binding
        for machine_id in MACHINES:
            await amqp.publish_json("machines", machine_id, machine_id.encode(), kind="assign")
            await amqp.publish_reply(machine_id, b"answer-" + machine_id.encode())
        for machine_id in MACHINES:
            queue = await channel.declare_queue(names.machine_queue(machine_id), passive=True)
            replies = await channel.declare_queue(
                names.machine_replies_queue(machine_id), passive=True
            )
            assignment = await queue.get(timeout=5)
            answer = await replies.get(timeout=5)
            assert (assignment.body, answer.body) == (
                machine_id.encode(),
                b"answer-" + machine_id.encode(),
            )
            await assignment.ack()
            await answer.ack()
        # Declared without arguments again: RabbitMQ would refuse it had m7's queue been
        # replaced by one with the product's arguments.
        await channel.declare_queue(names.machine_replies_queue("m7"), durable=True)
        refused = [r for r in caplog.records if "exists with other arguments" in r.getMessage()]
        assert [names.machine_replies_queue("m7") in r.getMessage() for r in refused] == [True]
    finally:
        await amqp.close()
        await other.close()
        await cleanup(settings, MACHINES)


def open_channels(amqp: Amqp) -> int:
    """Channels open on the adapter's connection (aiormq's own count)."""
    assert amqp.connection is not None and amqp.connection.transport is not None
    underlay = amqp.connection.transport.connection
    return sum(1 for channel in underlay.channels.values() if not channel.is_closed)


async def test_a_machine_queue_declared_with_another_type_is_refused_clearly_leaking_nothing() -> (
    None
):
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    # The operator switched machine_queue_type to classic; m1's queue is still a quorum queue.
    before = Amqp(url, names, machine_queue_type="quorum")
    amqp = Amqp(url, names, machine_queue_type="classic")
    try:
        await before.connect()
        await before.ensure_machine_queue("m1")
        await amqp.connect()
        await amqp.ensure_machine_queue("m2")
        settled = open_channels(amqp)
        for _ in range(30):
            with pytest.raises(ConfigurationError) as refused:
                await amqp.ensure_machine_queue("m1")
            assert names.machine_queue("m1") in str(refused.value)
            assert "RUNDISPATCH_MACHINE_QUEUE_TYPE" in str(refused.value)
        await asyncio.sleep(1.0)  # a robust channel reopens itself in the background
        # Every refusal closed a declaring channel: each was closed for good, not reopened
        # and dropped (2,047 of them and RabbitMQ closes the connection).
        assert open_channels(amqp) <= settled + 1
        await amqp.ensure_machine_queue("m3")  # declarations go on
        await amqp.publish_json("machines", "m3", b"x", kind="assign")
    finally:
        await amqp.close()
        await before.close()
        await cleanup(settings, ["m1", "m2", "m3"])


async def test_a_consumer_of_a_queue_not_declared_yet_leaks_no_channel() -> None:
    async with connected_amqp(["m1"]) as (amqp, names, _):
        settled = open_channels(amqp)

        async def handler(batch: object) -> list[object]:
            return []

        for _ in range(30):  # a worker waiting for the dispatcher to declare its queue
            with pytest.raises(BrokerUnavailable, match="does not exist yet"):
                await amqp.consume(names.machine_queue("m1"), handler, batch_size=10)  # type: ignore[arg-type]
        await asyncio.sleep(1.0)
        assert open_channels(amqp) <= settled + 1
