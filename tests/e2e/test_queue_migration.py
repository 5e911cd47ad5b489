"""``rundispatch queues migrate`` on the real RabbitMQ: a namespace declared with
``active_replicas=all`` holding runs not yet admitted, switched to ``one``: the queues are
declared again with their messages, each still from who sent it, and every run then runs once
under the new arguments."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import SecretStr

from dispatcher.adapters.amqp.identities import management_client, vhost_of
from dispatcher.adapters.amqp.migrate import impersonator, mover_principal
from dispatcher.adapters.amqp.topology import shared_queue_arguments
from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.core.principals import admin_user_of
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.tools.principals import principal_url
from tests.e2e.test_principals import publish_as, username_of
from tests.e2e.test_run_path import group_fleet
from tests.support.constants import OWNER
from tests.support.e2e import cli_json, submit_runs
from tests.support.privateredis import free_port
from tests.support.processes import REPO, Processes, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ONE = {"RUNDISPATCH_ACTIVE_REPLICAS": "one"}
EACH = 25


def migrate(procs: Processes, *extra: str) -> list[dict[str, Any]]:
    env = {**procs.env, **ONE}
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "queues", "migrate", "--json", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return list(json.loads(result.stdout))


async def senders_of(url: str, queue: str) -> Counter[str]:
    """The ``user_id`` of every message in ``queue``, read and left there: consumed without an
    acknowledgement (``basic.get`` is refused on a single-active-consumer queue), and given
    back when the connection closes."""
    connection = await aio_pika.connect(url)
    seen: Counter[str] = Counter()
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)

        async def count(message: AbstractIncomingMessage) -> None:
            seen[message.user_id or "?"] += 1

        await source.consume(count, no_ack=False)
        await asyncio.sleep(1.5)
    return seen


async def test_migrate_keeps_the_waiting_runs_and_their_senders(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    fleet = group_fleet(2)
    fleet["submitters"] = [{"name": "envx", "acts_for": [OWNER]}]
    apply_fleet(fleet)
    envx = cli_json(procs, "submitters", "register", "envx", "--acts-for", OWNER)
    envy = cli_json(procs, "submitters", "register", "envy", "--acts-for", "bob@contoso.com")
    declaring = procs.dispatcher("declaring")  # declares the namespace, active_replicas=all

    async def consumed() -> bool:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(names.requests_queue, passive=True)
            return bool(queue.declaration_result.consumer_count)

    await eventually(consumed, timeout=60, interval=0.3)
    declaring.terminate()
    declaring.wait(timeout=30)

    # Runs asked for while no replica runs wait in the requests queue: from the dispatcher's
    # identity, from a submitter acting for the owner, one from a submitter acting for another.
    run_ids = await submit_runs(client, EACH)
    for submitter, count in ((envx, EACH), (envy, 1)):
        for _ in range(count):
            run_id = uuid.uuid4().hex
            body = {"run_id": run_id, "flow_id": "invoice", "connection_id": "c1",
                    "requested_by": OWNER, "mode": "unattended"}  # fmt: skip
            user = username_of(submitter["amqp_url"])
            await publish_as(
                submitter["amqp_url"],
                names.requests_exchange,
                "submit",
                json.dumps(body).encode(),
                user,
            )
            if submitter is envx:
                run_ids.append(run_id)
            else:
                foreign = run_id
    before = await senders_of(url, names.requests_queue)
    assert before == {
        admin_user_of(url): EACH,
        username_of(envx["amqp_url"]): EACH,
        username_of(envy["amqp_url"]): 1,
    }, before

    assert {m["queue"]: m["state"] for m in migrate(procs, "--dry-run")} == {
        names.requests_queue: "differs",
        names.reports_queue: "differs",
    }
    migrated = {m["queue"]: m for m in migrate(procs)}
    assert migrated[names.requests_queue] == {
        "queue": names.requests_queue,
        "state": "migrated",
        "moved": 2 * EACH + 1,
    }
    assert migrated[names.reports_queue]["state"] == "migrated"

    # Declared as active_replicas=one asks, its messages and their senders kept; no holding
    # queue and no temporary user left.
    expected = shared_queue_arguments(names, one_active=True)
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in (names.requests_queue, names.reports_queue):
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True, arguments=expected[queue])
        for queue in (names.requests_queue, names.reports_queue):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(names.holding_queue(queue), passive=True)
    assert await senders_of(url, names.requests_queue) == before
    async with management_client(settings.broker_admin_url.get_secret_value(), 10) as api:
        users = (await api.get("/api/users")).json()
    assert mover_principal(names).username not in {u["name"] for u in users}

    again = migrate(procs)
    assert {m["state"] for m in again} == {"as_configured"}

    # The replicas of the new configuration run every run once; each submitter's runs are
    # taken as its own: envx's run, envy's (acting for another owner) refused.
    procs.dispatcher("one", env=ONE)
    procs.worker("m1")
    procs.worker("m2")
    runs = await asyncio.gather(*(client.wait(r, timeout=120) for r in run_ids))
    assert Counter(r.status for r in runs) == {RunStatus.succeeded: 2 * EACH}
    executions = Counter(e["run_id"] for e in procs.executions())
    assert set(executions) == set(run_ids) and max(executions.values()) == 1
    refused = await client.wait(foreign, timeout=30)
    assert refused.status is RunStatus.rejected and refused.error is not None
    assert refused.error.code is ErrorCode.ConnectionAccessDenied


async def test_a_migration_cut_short_is_finished_by_running_it_again(
    client: Client, settings: Settings, procs: Processes
) -> None:
    """The state a migration killed between deleting the old queue and declaring the new one
    leaves: the requests queue gone, its runs (and those published since) in the holding
    queue, which is bound in its place."""
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    holding = names.holding_queue(names.requests_queue)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names.requests_queue)
        kept = await channel.declare_queue(
            holding, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for key in ("submit", "cancel"):
            await kept.bind(names.requests_exchange, key)
    run_ids = await submit_runs(client, 5)
    migrated = {m["queue"]: m for m in migrate(procs)}
    assert migrated[names.requests_queue]["moved"] == len(run_ids)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        expected = shared_queue_arguments(names, one_active=True)[names.requests_queue]
        await channel.declare_queue(names.requests_queue, durable=True, arguments=expected)
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(holding, passive=True)
    assert await senders_of(url, names.requests_queue) == {admin_user_of(url): len(run_ids)}


async def test_the_mover_connects_to_a_cluster_s_first_node_that_answers(
    client: Client, settings: Settings
) -> None:
    """On a cluster the mover's URL lists every node (``principal_url``): the first one down,
    the second up (this broker)."""
    listed = settings.model_copy(
        update={
            "amqp_url": SecretStr(
                f"amqp://guest:guest@127.0.0.1:{free_port()}/,"
                + settings.amqp_url.get_secret_value()
            )
        }
    )
    names = Names(settings.namespace)
    admin = settings.broker_admin_url.get_secret_value()

    def url_for(user: str, password: str) -> str:
        return principal_url(listed, user, password)

    async with impersonator(
        admin, vhost_of(listed.amqp_url.get_secret_value()), names, url_for
    ) as mover:
        assert not mover.is_closed
