"""The sealed hand-off is bound to its assignment: a worker refuses an assignment whose flow or
inputs were changed on the way, on the real RabbitMQ and Redis with the real processes.

The test takes the assignment off the machine's queue before the worker sees it (a consumer
with a higher priority), changes one field, and puts the changed message back on the queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import online
from tests.support.processes import Processes, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def one_machine() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "bots", "name": "Bots"}],
        machines=[{"machine_id": "m1", "name": "M1", "group_id": "bots", "max_unattended_runs": 2}],
        connections=[
            {
                "connection_id": "c1",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "bots"},
                "username": "CONTOSO\\svc",
                "password": "pw-of-c1",
            }
        ],
    )


class Interceptor:
    """Takes the next assignment off a machine's queue and puts a changed copy back."""

    def __init__(self, settings: Settings, machine_id: str) -> None:
        self.settings = settings
        self.queue_name = Names(settings.namespace).machine_queue(machine_id)

    async def tamper(
        self, submit: Callable[[], Any], change: Callable[[dict[str, Any]], None]
    ) -> str:
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(self.queue_name, ensure=False)
            taken: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(taken.put, arguments={"x-priority": 100})
            run_id = str(await submit())
            message = await asyncio.wait_for(taken.get(), 20)
            await queue.cancel(tag)
            body = json.loads(message.body)
            assert body["request"]["run_id"] == run_id
            change(body)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    type=message.type,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue_name,
            )
            await message.ack()
            return run_id
        finally:
            await connection.close()


async def dead_letters(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(Names(settings.namespace).dead_queue, ensure=False)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found
    finally:
        await connection.close()


def swap_flow(body: dict[str, Any]) -> None:
    body["request"]["flow_id"] = "wire-transfer"


def swap_inputs(body: dict[str, Any]) -> None:
    body["request"]["inputs"] = {"duration_s": 0.01, "amount": 1_000_000}


async def test_an_assignment_with_another_flow_or_inputs_is_refused(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(one_machine())
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1", procs=procs)

    async def submit() -> str:
        return await client.submit(
            connection_id="c1",
            flow_id="invoice",
            requested_by=OWNER,
            mode="unattended",
            inputs={"duration_s": 0.01, "amount": 10},
        )

    intact = await client.wait(await submit(), timeout=30)
    assert intact.status is RunStatus.succeeded, intact.error

    interceptor = Interceptor(settings, "m1")
    refused = []
    for change in (swap_flow, swap_inputs):
        run_id = await interceptor.tamper(submit, change)
        run = await client.wait(run_id, timeout=30)
        assert run.status is RunStatus.failed
        assert run.error is not None and run.error.code is ErrorCode.FlowFailed
        assert "sealed secret does not open" in run.error.message
        assert not run.outputs  # the flow never ran
        refused.append(run_id)

    letters: list[str] = []

    async def all_dead_lettered() -> bool:
        for message in await dead_letters(settings):
            reason = str((message.headers or {}).get("x-rundispatch-reason", ""))
            if "sealed secret does not open" in reason:
                letters.append(json.loads(message.body)["request"]["run_id"])
        return len(letters) >= len(refused)

    await eventually(all_dead_lettered, 20)
    assert sorted(letters) == sorted(refused)
    again = await client.wait(await submit(), timeout=30)
    assert again.status is RunStatus.succeeded, again.error
