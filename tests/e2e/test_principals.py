"""Registered principals on the real RabbitMQ (management plugin on) and Redis: each machine and
submitter has its own identity, and the broker refuses what its job does not need; a machine's
worker key is pinned at its first heartbeat and another key is refused until the machine is
registered again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)

from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.errors import NotFound
from dispatcher.models import Heartbeat, RunStatus
from dispatcher.names import Names, event_binding
from dispatcher.settings import Settings
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import cli, cli_json, online, waiting_because
from tests.support.processes import Processes, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def two_machines() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "bots", "name": "Bots"}],
        machines=[
            {"machine_id": m, "name": m.upper(), "group_id": "bots", "max_unattended_runs": 2}
            for m in ("a1", "b1")
        ],
        connections=[
            {
                "connection_id": "c1",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"machine_id": "a1"},
                "username": "CONTOSO\\svc",
                "password": "pw-of-c1",
            }
        ],
    )


def two_machines_and_envx() -> dict[str, Any]:
    """:func:`two_machines` with submitter ``envx`` acting for the connection's owner."""
    document = two_machines()
    document["submitters"] = [{"name": "envx", "acts_for": [OWNER]}]
    return document


async def refused(
    url: str, action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]
) -> bool:
    """Whether the broker refuses ``action`` on a channel of ``url``'s identity."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        try:
            await action(channel)
        except ChannelAccessRefused:
            return True
        return False
    finally:
        await connection.close()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


def consume(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        declared = await channel.get_queue(queue, ensure=False)
        await declared.consume(ignore)

    return action


def publish(exchange: str, key: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b"{}"), routing_key=key)

    return action


def hold(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    """Declare ``queue`` exclusive to the connection (how a worker takes its machine's lease)."""

    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(queue, exclusive=True)

    return action


def bind_events(queue: str, key: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        declared = await channel.declare_queue(queue, exclusive=True)
        await declared.bind(
            await channel.get_exchange(queue.split(".", maxsplit=1)[0] + ".events", ensure=False),
            key,
        )

    return action


async def test_each_principal_may_do_only_its_job(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    apply_fleet(two_machines())
    a1 = cli_json(procs, "machines", "register", "a1")
    b1 = cli_json(procs, "machines", "register", "b1")
    assert a1["machine_id"] == "a1" and a1["amqp_url"].startswith("amqp://")
    x = cli_json(procs, "submitters", "register", "envx", "--acts-for", OWNER)
    y = cli_json(procs, "submitters", "register", "envy", "--acts-for", "bob@contoso.com")
    assert x["acts_for"] == [OWNER]

    # What each may do (the controls: the refusals below are about permissions, not URLs).
    assert not await refused(b1["amqp_url"], consume(names.machine_queue("b1")))
    assert not await refused(b1["amqp_url"], publish(names.heartbeats_exchange, ""))
    assert not await refused(b1["amqp_url"], hold(names.machine_lease_queue("b1")))
    assert not await refused(x["amqp_url"], publish(names.requests_exchange, "submit"))
    own = f"{x['queue_prefix']}events"
    assert not await refused(x["amqp_url"], bind_events(own, "run.*.envx"))

    # Machine B may not read A's queue, submit runs nor hand out assignments.
    assert await refused(b1["amqp_url"], consume(names.machine_queue("a1")))
    assert await refused(b1["amqp_url"], hold(names.machine_lease_queue("a1")))
    assert await refused(b1["amqp_url"], publish(names.requests_exchange, "submit"))
    assert await refused(b1["amqp_url"], publish(names.machines_exchange, "a1"))
    assert await refused(b1["amqp_url"], publish(names.events_exchange, "run.succeeded"))
    # A submitter may not read any machine queue nor hand out assignments.
    for machine in ("a1", "b1"):
        assert await refused(x["amqp_url"], consume(names.machine_queue(machine)))
    assert await refused(x["amqp_url"], publish(names.machines_exchange, "a1"))
    # Nor bind events of every run, or of another submitter's runs, nor use its queues.
    assert await refused(x["amqp_url"], bind_events(own, "run.#"))
    assert await refused(x["amqp_url"], bind_events(own, "run.*.envy"))
    assert await refused(y["amqp_url"], bind_events(own, "run.*.envx"))

    # Registering again rotates the identity: the old password no longer opens a connection.
    again = cli_json(procs, "machines", "register", "b1")
    assert again["amqp_url"] != b1["amqp_url"]
    with pytest.raises(ProbableAuthenticationError):
        await aio_pika.connect(b1["amqp_url"])
    cli(procs, "machines", "unregister", "b1")
    with pytest.raises(ProbableAuthenticationError):
        await aio_pika.connect(again["amqp_url"])


async def test_a_second_key_for_a_registered_machine_is_refused_until_it_is_registered_again(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(two_machines())
    procs.dispatcher()
    procs.worker("a1")  # registered as an operator would (machines register), then started
    await online(client, "a1", procs=procs)

    async def run() -> str:
        return await client.submit(
            connection_id="c1", flow_id="invoice", requested_by=OWNER, mode="unattended"
        )

    first = await client.wait(await run(), timeout=30)
    assert first.status is RunStatus.succeeded and first.machine_id == "a1"

    # Another process, with a1's credentials, presents another key (its own state directory)
    # once a1's worker is gone (while it runs, the machine's lease keeps any other out).
    procs.kill("worker-a1")
    other = ["--state-dir", str(procs.workdir / "other")]
    procs.worker("a1", name="impostor", extra=other)
    listed = await eventually(lambda: _machine(procs, "a1", "key_mismatch"), 20)
    assert listed["key_mismatch"] is True
    waiting = await run()
    await waiting_because(client, waiting, {"a1": ErrorCode.KeyMismatch.value})
    assert (await client.get(waiting)).status is RunStatus.queued  # no secret sealed to anyone
    assert "its key is not the one pinned" in procs.log_text("dispatcher")

    # The machine is registered again (new credentials) and its new worker started with them:
    # its key is pinned.
    procs.kill("worker-a1")
    procs.kill("impostor")
    again = cli_json(procs, "machines", "register", "a1")
    procs.worker("a1", name="renewed", extra=other, amqp_url=again["amqp_url"])
    done = await client.wait(waiting, timeout=30)
    assert done.status is RunStatus.succeeded
    assert not (await asyncio.to_thread(_machine, procs, "a1"))["key_mismatch"]
    ledger = (procs.workdir / "other" / "ledger.jsonl").read_text()
    assert json.dumps(waiting) in ledger  # the new worker ran it


def _machine(procs: Processes, machine_id: str, truthy: str | None = None) -> Any:
    rows = {row["machine_id"]: row for row in cli_json(procs, "machines", "list")}
    row = rows[machine_id]
    return row if truthy is None or row[truthy] else None


async def publish_as(url: str, exchange: str, key: str, body: bytes, user_id: str | None) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(body, content_type="application/json", user_id=user_id)
        await target.publish(message, routing_key=key)
    finally:
        await connection.close()


def username_of(url: str) -> str:
    return url.split("//", 1)[1].split(":", 1)[0]


async def test_messages_are_accepted_only_from_who_may_send_them(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    apply_fleet(two_machines())
    a1 = cli_json(procs, "machines", "register", "a1")
    x = cli_json(procs, "submitters", "register", "envx", "--acts-for", "nobody@contoso.com")
    y = cli_json(procs, "submitters", "register", "envy", "--acts-for", "bob@contoso.com")
    # The fleet file says whom each submitter acts for (here: it gives envx to OWNER).
    with_submitters = two_machines()
    with_submitters["submitters"] = [{"name": "envx", "acts_for": [OWNER]}]
    apply_fleet(with_submitters)
    procs.dispatcher()
    procs.worker("a1", amqp_url=a1["amqp_url"])  # its own identity, and no Redis URL
    await online(client, "a1", procs=procs)

    # A heartbeats as B, with its own (validated) user id, or with none: refused, B unchanged.
    forged = Heartbeat(machine_id="b1", worker_id="forger", sent_at=time.time())
    for user_id in (username_of(a1["amqp_url"]), None):
        await publish_as(
            a1["amqp_url"], names.heartbeats_exchange, "", forged.model_dump_json().encode(),
            user_id,
        )  # fmt: skip
    # A's identity reports an outcome for B's run: refused too, whatever it names.
    finish = {"op": "finish", "machine_id": "b1", "worker_id": "forger", "correlation_id": "1",
              "outcomes": [{"run_id": "any", "fence": 1, "status": "succeeded"}]}  # fmt: skip
    await publish_as(
        a1["amqp_url"], names.reports_exchange, "report", json.dumps(finish).encode(),
        username_of(a1["amqp_url"]),
    )  # fmt: skip
    # RabbitMQ itself refuses a user id that is not the publisher's.
    assert await refused_by_broker(a1["amqp_url"], names, "guest")
    letters: list[Any] = []

    async def all_dead_lettered() -> bool:
        letters.extend(await dead_letters(settings, "may not speak for it"))
        return len(letters) >= 3

    await eventually(all_dead_lettered, 20)
    assert len(letters) == 3
    assert not _machine(procs, "b1")["online"]

    # A submitter may run connections of the owners it acts for, and only those.
    def request(run_id: str) -> bytes:
        return json.dumps(
            {"run_id": run_id, "flow_id": "invoice", "connection_id": "c1",
             "requested_by": OWNER, "mode": "unattended"}
        ).encode()  # fmt: skip

    # X follows its runs' events on a queue of its own: it may bind only keys naming it.
    follower = await aio_pika.connect(x["amqp_url"])
    channel = await follower.channel()
    events = await channel.declare_queue(f"{x['queue_prefix']}events", exclusive=True)
    await events.bind(names.events_exchange, event_binding("run.*", "envx"))
    for run_id, submitter in (("by-x", x), ("by-y", y)):
        user = username_of(submitter["amqp_url"])
        await publish_as(
            submitter["amqp_url"], names.requests_exchange, "submit", request(run_id), user
        )
    ran = await client.wait("by-x", timeout=30)
    assert ran.status is RunStatus.succeeded
    denied = await client.wait("by-y", timeout=30)
    assert denied.status is RunStatus.rejected and denied.error is not None
    assert denied.error.code is ErrorCode.ConnectionAccessDenied
    assert "may not submit runs for" in denied.error.message
    seen: list[tuple[str, str]] = []

    async def followed_to_the_end() -> bool:
        while (message := await events.get(no_ack=True, fail=False)) is not None:
            seen.append((json.loads(message.body)["run_id"], str(message.routing_key)))
        return ("by-x", "run.succeeded.envx") in seen

    try:
        await eventually(followed_to_the_end, 20)
    finally:
        await follower.close()
    assert {run_id for run_id, _ in seen} == {"by-x"}  # nothing of Y's runs, nor of others'
    assert [key for _, key in seen] == [
        f"run.{status}.envx" for status in ("queued", "dispatched", "started", "succeeded")
    ]


async def refused_by_broker(url: str, names: Names, user_id: str) -> bool:
    """Whether RabbitMQ refuses a message whose user id is not the publisher's."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        target = await channel.get_exchange(names.heartbeats_exchange, ensure=False)
        try:
            await target.publish(aio_pika.Message(b"{}", user_id=user_id), routing_key="")
        except ChannelPreconditionFailed:
            return True
        return False
    finally:
        await connection.close()


async def dead_letters(settings: Settings, reason: str) -> list[Any]:
    """Take the dead-lettered messages whose reason contains ``reason``."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    found = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(Names(settings.namespace).dead_queue, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            if reason in str((message.headers or {}).get("x-rundispatch-reason", "")):
                found.append(message)
    finally:
        await connection.close()
    return found


async def test_generated_definitions_provision_the_same_identities(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    apply_fleet(two_machines_and_envx())
    credentials = procs.workdir / "credentials.json"
    printed = cli(
        procs, "broker", "definitions", "--credentials-out", str(credentials), "--operators", "ops1"
    ).stdout
    definitions = json.loads(printed)
    assert credentials.stat().st_mode & 0o777 == 0o600
    urls = json.loads(credentials.read_text())
    assert set(urls) == {names.machine_user("a1"), names.machine_user("b1"),
                         names.submitter_user("envx"), names.operator_user("ops1")}  # fmt: skip
    assert not any(url.split("@")[0].split(":")[-1] in printed for url in urls.values())

    # An operator imports them (here through the management API, as rabbitmqadmin does).
    admin = httpx.URL(settings.broker_admin_url.get_secret_value())
    async with httpx.AsyncClient(
        base_url=str(admin.copy_with(username=None, password=None)),
        auth=(admin.username, admin.password),
    ) as api:
        response = await api.post("/api/definitions", json=definitions)
        assert response.status_code in (200, 201, 204), response.text

    a1 = urls[names.machine_user("a1")]
    assert not await refused(a1, consume(names.machine_queue("a1")))
    assert await refused(a1, consume(names.machine_queue("b1")))
    assert await refused(a1, publish(names.requests_exchange, "submit"))
    envx = urls[names.submitter_user("envx")]
    assert await refused(envx, consume(names.machine_queue("a1")))
    assert not await refused(envx, publish(names.requests_exchange, "submit"))
    ops1 = urls[names.operator_user("ops1")]
    assert await refused(ops1, consume(names.machine_queue("a1")))
    assert await refused(ops1, publish(names.machines_exchange, "a1"))
    assert not await refused(ops1, consume(names.dead_queue))


async def test_an_operator_watches_every_run_cancels_any_and_submits_none(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    apply_fleet(two_machines_and_envx())
    a1 = cli_json(procs, "machines", "register", "a1")
    x = cli_json(procs, "submitters", "register", "envx", "--acts-for", OWNER)
    ops = cli_json(procs, "operators", "register", "ops1")
    url, user = ops["amqp_url"], names.operator_user("ops1")
    assert ops["username"] == user and username_of(url) == user

    # The broker refuses it everything but watching and the requests exchange.
    for machine in ("a1", "b1"):
        assert await refused(url, consume(names.machine_queue(machine)))
        assert await refused(url, consume(names.machine_replies_queue(machine)))
    for queue in (names.requests_queue, names.reports_queue, names.heartbeats_queue):
        assert await refused(url, consume(queue))
    assert await refused(url, publish(names.machines_exchange, "a1"))
    assert await refused(url, publish(names.events_exchange, "run.succeeded.envx"))
    assert await refused(url, publish(names.heartbeats_exchange, ""))
    assert await refused(url, publish(names.reports_exchange, "report"))
    assert await refused(url, bind_events(f"{x['queue_prefix']}spy", "run.#"))  # not its queue
    assert not await refused(url, consume(names.dead_queue))

    # It follows every run's events, whoever submitted them.
    watcher = await aio_pika.connect(url)
    channel = await watcher.channel()
    events = await channel.declare_queue(f"{ops['queue_prefix']}watch", exclusive=True)
    await events.bind(names.events_exchange, "run.#")
    procs.dispatcher()

    def request(run_id: str) -> bytes:
        return json.dumps(
            {"run_id": run_id, "flow_id": "invoice", "connection_id": "c1",
             "requested_by": OWNER, "mode": "unattended"}
        ).encode()  # fmt: skip

    try:
        # A run of X waits (its machine is not online yet); the operator cancels it.
        await publish_as(
            x["amqp_url"], names.requests_exchange, "submit", request("waits"),
            username_of(x["amqp_url"]),
        )  # fmt: skip

        async def waiting() -> bool:
            try:
                return (await client.get("waits")).status is RunStatus.queued
            except NotFound:
                return False

        await eventually(waiting, 30)
        cancel = json.dumps({"run_id": "waits", "reason": "operator: wrong flow"}).encode()
        await publish_as(url, names.requests_exchange, "cancel", cancel, user)
        cancelled = await client.wait("waits", timeout=30)
        assert cancelled.status is RunStatus.cancelled
        # Its own run request is refused: an operator acts for no owner.
        await publish_as(url, names.requests_exchange, "submit", request("by-ops"), user)
        denied = await client.wait("by-ops", timeout=30)
        assert denied.status is RunStatus.rejected and denied.error is not None
        assert denied.error.code is ErrorCode.ConnectionAccessDenied
        assert "operator ops1 may not submit runs" in denied.error.message
        # X's next run runs; the operator sees it through.
        procs.worker("a1", amqp_url=a1["amqp_url"])
        await online(client, "a1", procs=procs)
        await publish_as(
            x["amqp_url"], names.requests_exchange, "submit", request("by-x"),
            username_of(x["amqp_url"]),
        )  # fmt: skip
        assert (await client.wait("by-x", timeout=30)).status is RunStatus.succeeded
        seen: list[tuple[str, str]] = []

        async def watched_to_the_end() -> bool:
            while (message := await events.get(no_ack=True, fail=False)) is not None:
                seen.append((json.loads(message.body)["run_id"], str(message.routing_key)))
            return ("by-x", "run.succeeded.envx") in seen

        await eventually(watched_to_the_end, 20)
    finally:
        await watcher.close()
    assert ("waits", "run.cancelled.envx") in seen
    assert ("by-ops", "run.rejected.-") in seen
    assert [key for run_id, key in seen if run_id == "by-x"] == [
        f"run.{status}.envx" for status in ("queued", "dispatched", "started", "succeeded")
    ]
