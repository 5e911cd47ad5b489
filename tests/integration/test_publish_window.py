"""An outbox window published as one write (``adapters/amqp/window.py``) on the real RabbitMQ:
every message arrives once, in order, and an assignment RabbitMQ returns (its machine queue
is gone) is published again once the queue is declared, as a message published alone is."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from dispatcher.usecases.results import OutboxMessage
from tests.support.processes import cleanup, connected_amqp, eventually, new_settings

pytestmark = [pytest.mark.timeout(90)]


def message(index: int, kind: str, key: str) -> OutboxMessage:
    return OutboxMessage(id=f"w-{index}", kind=kind, routing_key=key, body=b"%d" % index)


async def test_a_window_arrives_whole_and_a_returned_assignment_is_sent_again() -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    amqp = Amqp(url, names)
    received: dict[str, list[bytes]] = {"m1": [], "m2": []}

    def handler_for(machine: str):  # type: ignore[no-untyped-def]
        async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
            received[machine].extend(d.body for d in batch)
            return [Ack() for _ in batch]

        return handler

    try:
        await amqp.connect()
        for machine in received:
            await amqp.ensure_machine_queue(machine)
        await amqp.consume(names.machine_queue("m1"), handler_for("m1"), batch_size=50)
        window = [message(i, "assign", "m1") for i in range(40)]
        window += [message(100 + i, "event", "run.started.x") for i in range(40)]
        await amqp.publish_outbox(window)
        await eventually(lambda: received["m1"] == [b"%d" % i for i in range(40)], timeout=10)

        # m2's queue deleted behind the adapter's back: its assignment is returned.
        other = await aio_pika.connect(url)
        async with other:
            channel = await other.channel()
            await channel.queue_delete(names.machine_queue("m2"))
        await amqp.publish_outbox([message(200, "assign", "m2"), message(201, "assign", "m1")])
        await amqp.consume(names.machine_queue("m2"), handler_for("m2"), batch_size=50)
        await eventually(lambda: received["m2"] == [b"200"], timeout=10)
        await eventually(lambda: received["m1"][-1:] == [b"201"], timeout=10)
        await asyncio.sleep(0.3)
        assert received["m2"] == [b"200"]
        assert received["m1"].count(b"201") == 1
    finally:
        await amqp.close()
        await cleanup(settings, machine_ids=list(received))


async def test_replies_are_transient_and_assignments_persistent() -> None:
    """A reply is not written to disk (a worker asks again when none comes; see
    ``window.TRANSIENT_KINDS``), alone or in a window; an assignment is."""
    async with connected_amqp(["m1"]) as (amqp, names, url):
        await amqp.ensure_machine_queue("m1")
        await amqp.publish_reply("m1", b"alone")
        await amqp.publish_many_json(
            "machines", [(names.replies_key("m1"), b"w%d" % i) for i in range(3)], kind="reply"
        )
        await amqp.publish_outbox([message(1, "assign", "m1")])
        other = await aio_pika.connect(url)
        async with other:
            channel = await other.channel()
            modes: dict[bytes, int | None] = {}
            for queue in (names.machine_replies_queue("m1"), names.machine_queue("m1")):
                declared = await channel.declare_queue(queue, passive=True)
                while (got := await declared.get(no_ack=True, fail=False)) is not None:
                    modes[got.body] = int(got.delivery_mode) if got.delivery_mode else None
        assert modes == {b"alone": 1, b"w0": 1, b"w1": 1, b"w2": 1, b"1": 2}
