"""The product on a 3-node RabbitMQ cluster: two dispatchers and two workers given every node's
URL (``RUNDISPATCH_AMQP_URL`` comma-separated) carry a load while the test SIGKILLs the node
leading the requests queue and a machine queue: every run ends once, none is lost, none runs
twice, nothing is dead-lettered. Redis is the shared one (a namespace of its own)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from dispatcher.adapters.amqp.cluster import connect_any
from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.chaos.test_chaos import drain
from tests.cluster.conftest import record
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.processes import Processes, new_settings

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

RUNS = 400
RATE = 40.0  # runs per second
MACHINES = ("m1", "m2")


@pytest.fixture
def settings(cluster: Any) -> Settings:
    return new_settings(
        amqp_url=",".join(cluster.urls),
        # Machines are registered through the cluster's own management API (users are
        # cluster-wide), not the shared broker's.
        broker_admin_url=f"http://guest:guest@127.0.0.1:{cluster.nodes[0].management_port}",
        throttle_per_minute=10_000_000,
        heartbeat_interval_s=0.5,
        offline_after_s=20.0,
        running_grace_s=10.0,
        outbox_relay_after_s=2.0,
    )


def fleet() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "bots", "name": "Cluster bots"}],
        machines=[
            {"machine_id": m, "name": m.upper(), "group_id": "bots", "os": "windows_server",
             "max_unattended_runs": 5}
            for m in MACHINES
        ],
        connections=[
            {"connection_id": "c1", "owner": OWNER, "kind": "credentials",
             "target": {"group_id": "bots"}, "username": "CONTOSO\\svc-bot", "password": "pw"}
        ],
    )  # fmt: skip


async def submit_all(client: Client, run_ids: list[str], stats: Counter[str]) -> None:
    began = time.monotonic()
    for index, run_id in enumerate(run_ids):
        delay = began + index / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            try:
                await asyncio.wait_for(
                    client.submit(
                        connection_id="c1", flow_id="cluster", requested_by=OWNER,
                        mode="unattended", inputs={"duration_s": 0.02}, run_id=run_id,
                    ),
                    timeout=10,
                )  # fmt: skip
                break
            except Exception as exc:
                stats[f"publish retry {type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)


async def dead_lettered(settings: Settings, urls: list[str]) -> int:
    connection = await connect_any(urls)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.namespace).dead_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)


@pytest.mark.skip(
    reason="known gap: with workers speaking only AMQP, a worker's replies queue (classic, "
    "on the node that is killed) is lost with its node and the worker's starts and outcomes "
    "wait for answers that never come; runs after the kill are not finished (see "
    "docs/operations.md, cluster)"
)
async def test_no_run_lost_or_run_twice_when_queue_leaders_die(
    cluster: Any,
    client: Client,
    settings: Settings,
    procs: Processes,
    apply_fleet: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    apply_fleet(fleet())
    for name in ("d1", "d2"):
        procs.dispatcher(name)
    for machine in MACHINES:
        procs.worker(machine)
    names = Names(settings.namespace)
    run_ids = [f"cl-{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(RUNS)]
    stats: Counter[str] = Counter()
    submitting = asyncio.create_task(submit_all(client, run_ids, stats))
    await asyncio.sleep(3.0)
    queues = [names.requests_queue, names.machine_queue("m1")]
    leaders = [await asyncio.to_thread(cluster.leader_of, queue) for queue in queues]
    stopped: list[str] = []
    for leader in dict.fromkeys(leaders):  # each leading node once, in order
        took = await asyncio.to_thread(cluster.stop_node, leader, kill=True)
        stopped.append(leader)
        record(f"product on cluster: SIGKILL of {leader} (leader)", took)
        await asyncio.sleep(4.0)
        if leader != list(dict.fromkeys(leaders))[-1]:
            await asyncio.to_thread(cluster.start_node, leader)  # keep a quorum of nodes
    await submitting
    records = await drain(client, run_ids, 60.0)
    executions = Counter(e["run_id"] for e in procs.executions())
    lost = [
        r for r, rec in zip(run_ids, records, strict=True) if rec is None or not rec.status.terminal
    ]
    twice = [r for r, n in executions.items() if n > 1]
    failed = [
        (r, rec.status.value, rec.error.code.value if rec.error else None)
        for r, rec in zip(run_ids, records, strict=True)
        if rec is not None and rec.status.terminal and rec.status is not RunStatus.succeeded
    ]
    live = [node.amqp_url for node in cluster.nodes if cluster.is_running(node.name)]
    dead = await dead_lettered(settings, live or cluster.urls)
    with capsys.disabled():
        print(
            f"\nproduct on cluster: leaders {leaders}, stopped {stopped}, runs {RUNS}, "
            f"lost {len(lost)}, twice {len(twice)}, not succeeded {len(failed)}, "
            f"dead-lettered {dead}, publish {dict(stats)}",
            flush=True,
        )
    record("product on cluster: runs lost / run twice", f"{len(lost)} / {len(twice)}", "")
    assert not lost, lost[:10]
    assert not twice, twice[:10]
    assert not failed, failed[:10]
    assert dead == 0
    assert all(executions.get(r, 0) == 1 for r in run_ids)
