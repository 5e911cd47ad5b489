"""``active_replicas=one`` on the real RabbitMQ: of two replicas one consumes every shared
queue and the other stands by; killed mid-load (SIGKILL), the active one hands the queues to
the standby, and every run completes once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest

from dispatcher.adapters.amqp.consumers import read_consumers
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.adapters.amqp.topology import consumed_queues
from dispatcher.client import Client
from dispatcher.errors import NotFound
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.e2e.test_doctor import doctor
from tests.e2e.test_run_path import group_fleet
from tests.support.e2e import submit_runs
from tests.support.processes import Processes, eventually, new_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

RUNS = 120


@pytest.fixture
def settings() -> Settings:
    return new_settings(active_replicas="one")


async def active_of(settings: Settings) -> dict[str, set[str]]:
    """Per shared queue, the connections RabbitMQ delivers to ("?" for none)."""
    consumers = await read_consumers(
        settings.broker_admin_url.get_secret_value(),
        vhost_of(settings.amqp_url.get_secret_value()),
        consumed_queues(Names(settings.namespace)),
    )
    return {
        queue: {c.connection for c in of_queue if c.active} or {"?"}
        for queue, of_queue in consumers.items()
    }


async def test_the_standby_takes_over_from_a_killed_active_replica_and_no_run_is_lost_or_twice(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(group_fleet(2))
    first = procs.dispatcher("d1")
    one = f":{first.pid}"

    async def consumes_all(pid: str) -> bool:
        return all(
            len(active) == 1 and next(iter(active)).endswith(pid)
            for active in (await active_of(settings)).values()
        )

    await eventually(lambda: consumes_all(one), timeout=60, interval=0.5)
    second = procs.dispatcher("d2")
    two = f":{second.pid}"
    procs.worker("m1")
    procs.worker("m2")

    # Both replicas consume every shared queue; RabbitMQ delivers to the first one only.
    async def both_registered() -> bool:
        consumers = await read_consumers(
            settings.broker_admin_url.get_secret_value(),
            vhost_of(settings.amqp_url.get_secret_value()),
            consumed_queues(Names(settings.namespace)),
        )
        return all(
            {c.connection.rsplit(":", 1)[-1] for c in of_queue} == {str(first.pid), str(second.pid)}
            for of_queue in consumers.values()
        )

    await eventually(both_registered, timeout=60, interval=0.5)
    assert await consumes_all(one)
    _, checks, _ = doctor(procs)
    replicas = checks["rabbitmq.replicas"]
    assert replicas["status"] == "ok", replicas
    assert replicas["detail"].startswith("active: ") and two in replicas["detail"], replicas

    before = await submit_runs(client, RUNS // 2, duration_s=0.2)
    await eventually(lambda: _succeeded(client, before, at_least=10), timeout=60, interval=0.2)
    procs.kill("d1")  # SIGKILL: its connection closes without a word
    after = await submit_runs(client, RUNS // 2, duration_s=0.2)
    await eventually(lambda: consumes_all(two), timeout=60, interval=0.5)

    run_ids = before + after
    runs = await asyncio.gather(*(client.wait(r, timeout=150) for r in run_ids))
    assert Counter(r.status for r in runs) == {RunStatus.succeeded: RUNS}
    executions = Counter(e["run_id"] for e in procs.executions())
    assert set(executions) == set(run_ids)
    assert max(executions.values()) == 1, [r for r, n in executions.items() if n > 1]
    assert procs.alive("d2")


async def _succeeded(client: Client, run_ids: list[str], at_least: int) -> bool:
    done = 0
    for run_id in run_ids:
        with contextlib.suppress(NotFound):  # not admitted yet
            done += (await client.get(run_id)).status == RunStatus.succeeded
    return done >= at_least
