"""A machine queue deleted under its consumer (RabbitMQ cancels the consumer): the queue is
declared again, with its binding, and consuming resumes, so later assignments arrive. The
assignment lost with the queue is the sweeper's (``requeue_unstarted``). A machine's replies
queue deleted under its worker is declared again by the dispatcher's next answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.ports import Ack, Delivery, Verdict
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import in_status, online
from tests.support.processes import Processes, cleanup, eventually, new_settings

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


async def test_a_worker_consumer_resumes_when_its_deleted_queue_comes_back() -> None:
    """The worker's side: its connection declares nothing, so its consumer, cancelled with
    the queue, is restored by the robust channel once someone (the dispatcher, at the next
    heartbeat) declares the queue again; the restored consumer reads assignments in full."""
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    dispatcher = Amqp(url, names)
    worker = Amqp(url, names, declare=False)
    read: list[tuple[bytes, str | None, str | None, bool]] = []

    async def handler(batch: Sequence[Delivery]) -> list[Verdict]:
        read.extend((d.body, d.type, d.routing_key, bool(d.user_id)) for d in batch)
        return [Ack() for _ in batch]

    try:
        await dispatcher.connect()
        await worker.connect()
        await dispatcher.ensure_machine_queue("m1")
        task = await worker.consume(names.machine_queue("m1"), handler, batch_size=10)
        await dispatcher.publish_json("machines", "m1", b"before", kind="assign")
        await eventually(lambda: len(read) == 1, timeout=10)
        other = await aio_pika.connect(url)
        async with other:
            channel = await other.channel()
            await channel.queue_delete(names.machine_queue("m1"))
        await asyncio.sleep(2.0)  # the worker's channel probes the missing queue meanwhile
        again = Amqp(url, names)
        try:
            await again.connect()
            await again.ensure_machine_queue("m1")
        finally:
            await again.close()
        await dispatcher.publish_json("machines", "m1", b"after", kind="assign")
        await eventually(lambda: len(read) == 2, timeout=30, interval=0.5)
        assert read == [
            (b"before", "assign", "m1", True),
            (b"after", "assign", "m1", True),
        ]
        assert not task.done(), "the consumer loop ended"
        task.cancel()
    finally:
        await worker.close()
        await dispatcher.close()
        await cleanup(settings, machine_ids=["m1"])


async def test_a_deleted_replies_queue_is_declared_again_and_runs_still_finish_once(
    settings: Settings, client: Client, procs: Processes, apply_fleet: Any
) -> None:
    """A worker's replies queue deleted under it (RabbitMQ cancels the worker's consumer):
    the dispatcher's answer comes back unroutable, the queue is declared again (with its
    binding) and the answer published once more, and the worker's consumer is restored. The
    run in flight when the queue went and a run submitted after it end once each."""
    apply_fleet(one_machine())
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1", procs=procs)
    names = Names(settings.namespace)

    async def submit(duration_s: float) -> str:
        return await client.submit(
            connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended",
            inputs={"duration_s": duration_s},
        )  # fmt: skip

    first = await submit(3.0)
    await in_status(client, first, RunStatus.running)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names.machine_replies_queue("m1"))
    second = await submit(0.0)
    for run_id in (first, second):
        run = await client.wait(run_id, timeout=60)
        assert run.status is RunStatus.succeeded, run
    executions = Counter(e["run_id"] for e in procs.executions())
    assert executions == {first: 1, second: 1}
    assert "replies queue of machine m1 is gone: declared again" in procs.log_text("dispatcher")


def one_machine() -> dict[str, Any]:
    return fleet_document(
        machines=[{"machine_id": "m1", "name": "M1", "os": "windows_server",
                   "max_unattended_runs": 2}],
        connections=[{"connection_id": "c1", "owner": OWNER, "kind": "credentials",
                      "target": {"machine_id": "m1"}, "username": "CONTOSO\\svc",
                      "password": "pw"}],
    )  # fmt: skip
