"""The run path on the real RabbitMQ and Redis, with the dispatcher and workers as processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import aio_pika
import pytest

from dispatcher.client import Client
from dispatcher.core.principals import admin_user_of
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import OWNER
from tests.support.processes import (
    Processes,
    eventually,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def group_fleet(machines: int = 3) -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "finance", "name": "Finance bots"}],
        machines=[
            {
                "machine_id": f"m{i}",
                "name": f"FIN-0{i}",
                "group_id": "finance",
                "os": "windows_server",
                "max_unattended_runs": 4,
            }
            for i in range(1, machines + 1)
        ],
        connections=[
            {
                "connection_id": "c1",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "finance"},
                "username": "CONTOSO\\svc-fin",
                "password": "s3cret-pw",
            }
        ],
    )


async def start_fleet(procs: Processes, apply_fleet: Any, machines: int = 3) -> None:
    apply_fleet(group_fleet(machines))
    procs.dispatcher()
    for i in range(1, machines + 1):
        procs.worker(f"m{i}")


async def test_200_runs_spread_over_three_machines_each_run_once(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start_fleet(procs, apply_fleet)
    run_ids = [
        await client.submit(
            connection_id="c1",
            flow_id="invoice",
            requested_by=OWNER,
            mode="unattended",
            inputs={"duration_s": 0.02},
        )
        for _ in range(200)
    ]
    runs = await asyncio.gather(*(client.wait(r, timeout=120) for r in run_ids))
    assert Counter(r.status for r in runs) == {RunStatus.succeeded: 200}
    per_machine = Counter(r.machine_id for r in runs)
    assert set(per_machine) == {"m1", "m2", "m3"}, per_machine
    assert min(per_machine.values()) >= 20, per_machine
    executions = Counter(e["run_id"] for e in procs.executions())
    assert set(executions) == set(run_ids)
    assert max(executions.values()) == 1
    for run in runs[:5]:
        lifecycle = [e.event for e in run.timeline if e.event != "waiting"]
        assert lifecycle == ["queued", "dispatched", "started", "succeeded"]


async def test_unknown_connection_and_foreign_user_are_rejected(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start_fleet(procs, apply_fleet, machines=1)
    unknown = await client.submit(
        connection_id="nope", flow_id="f", requested_by=OWNER, mode="unattended"
    )
    foreign = await client.submit(
        connection_id="c1", flow_id="f", requested_by="mallory@contoso.com", mode="unattended"
    )
    run = await client.wait(unknown, timeout=20)
    assert run.status is RunStatus.rejected
    assert run.error is not None and run.error.code.value == "ConnectionNotFound"
    run = await client.wait(foreign, timeout=20)
    assert run.status is RunStatus.rejected
    assert run.error is not None and run.error.code.value == "ConnectionAccessDenied"
    assert procs.executions() == []


async def test_bad_messages_are_dead_lettered_while_valid_runs_flow(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    await start_fleet(procs, apply_fleet, machines=1)
    names = Names(settings.namespace)
    wrong_types = {
        "run_id": 42,
        "flow_id": ["f"],
        "connection_id": "c1",
        "requested_by": OWNER,
        "mode": "sometimes",
    }
    bad = [b"\x00\xffgarbage\x13", b"[1, 2, 3]", json.dumps(wrong_types).encode()]
    admin = admin_user_of(settings.amqp_url.get_secret_value())
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        valid_ids = []
        for body in bad:
            await exchange.publish(
                aio_pika.Message(body, content_type="application/json", user_id=admin), "submit"
            )
            valid_ids.append(
                await client.submit(
                    connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended"
                )
            )
        runs = await asyncio.gather(*(client.wait(r, timeout=30) for r in valid_ids))
        assert all(r.status is RunStatus.succeeded for r in runs)
        dead = await channel.get_queue(names.dead_queue)
        received: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def drained() -> bool:
            message = await dead.get(no_ack=True, fail=False)
            if message is not None:
                received.append(message)
            return len(received) >= 3

        await eventually(drained, timeout=20)
    bodies = {m.body: (m.headers or {}).get("x-rundispatch-reason") for m in received}
    assert set(bodies) == set(bad)
    assert "UTF-8" in str(bodies[bad[0]])
    assert "object" in str(bodies[bad[1]])
    assert "run_id" in str(bodies[bad[2]]) and "mode" in str(bodies[bad[2]])
    assert procs.alive("dispatcher")


async def test_same_run_id_twice_runs_once(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start_fleet(procs, apply_fleet, machines=2)
    run_id = f"dup-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        await client.submit(
            connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended", run_id=run_id
        )
    run = await client.wait(run_id, timeout=20)
    assert run.status is RunStatus.succeeded
    await client.submit(
        connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended", run_id=run_id
    )
    marker = await client.submit(
        connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended"
    )
    await client.wait(marker, timeout=20)
    assert [e["run_id"] for e in procs.executions()].count(run_id) == 1
    assert (await client.get(run_id)).timeline[0].event == "queued"
    assert sum(1 for e in (await client.get(run_id)).timeline if e.event == "started") == 1


async def test_cancel_of_an_unknown_run_is_dead_lettered(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    await start_fleet(procs, apply_fleet, machines=1)
    names = Names(settings.namespace)
    admin = admin_user_of(settings.amqp_url.get_secret_value())
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        await exchange.publish(
            aio_pika.Message(
                b'{"run_id": "no-such-run"}', content_type="application/json", user_id=admin
            ),
            "cancel",
        )
        valid = await client.submit(
            connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended"
        )
        assert (await client.wait(valid, timeout=30)).status is RunStatus.succeeded
        dead = await channel.get_queue(names.dead_queue)
        found: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def dead_lettered() -> bool:
            message = await dead.get(no_ack=True, fail=False)
            if message is not None:
                found.append(message)
            return bool(found)

        await eventually(dead_lettered, timeout=20)
    assert found[0].body == b'{"run_id": "no-such-run"}'
    assert "does not exist" in str((found[0].headers or {}).get("x-rundispatch-reason"))
