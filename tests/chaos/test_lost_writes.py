"""Redis losing its last writes (a host crash inside AOF's window, a failover to a lagging
replica): the dispatcher repairs the lost start or outcome from what the worker reports, and
never moves a run that belongs to another token."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dispatcher.client import Client
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

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def fleet() -> dict[str, Any]:
    return fleet_document(
        machines=[{"machine_id": "m1", "name": "M1", "max_unattended_runs": 2}],
        connections=[
            {
                "connection_id": f"c{i}",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"machine_id": "m1"},
                "username": f"CONTOSO\\svc{i}",
                "password": "pw",
            }
            for i in (1, 2)
        ],
    )


async def test_a_lost_start_and_a_lost_outcome_are_repaired_from_heartbeats(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(fleet())
    procs.dispatcher()
    procs.worker("m1")
    names = Names(settings.namespace)
    redis = client.rt.redis

    # A lost start: the run runs on m1, but the store goes back to "dispatched".
    long_run = await client.submit(
        connection_id="c1",
        flow_id="f",
        requested_by=OWNER,
        mode="unattended",
        inputs={"duration_s": 6},
    )
    await eventually(lambda: _status(client, long_run, RunStatus.running), timeout=30)
    await redis.hset(names.run(long_run), "status", '"dispatched"')
    await redis.hdel(names.run(long_run), "started_at")
    await eventually(lambda: _status(client, long_run, RunStatus.running), timeout=10)
    assert any(e.event == "started" for e in (await client.get(long_run)).timeline)

    # A lost outcome: the run succeeded on m1, but the store goes back to "running".
    short_run = await client.submit(
        connection_id="c2",
        flow_id="f",
        requested_by=OWNER,
        mode="unattended",
        inputs={"duration_s": 0.05},
    )
    done = await client.wait(short_run, timeout=30)
    assert done.status is RunStatus.succeeded
    await redis.hset(names.run(short_run), mapping={"status": '"running"'})
    await redis.hset(names.machine_assigned("m1"), short_run, f"unattended|{done.fence}|x")
    repaired = await eventually(lambda: _status(client, short_run, RunStatus.succeeded), timeout=10)
    assert repaired
    last = (await client.get(short_run)).timeline[-1]
    assert last.event == "succeeded" and (last.detail or {}).get("reconciled") is True
    assert await redis.hget(names.machine_assigned("m1"), short_run) is None

    # A report never moves a run that now belongs to another token.
    await redis.hset(names.run(short_run), mapping={"status": '"running"', "fence": "999999"})
    await redis.hset(names.machine_assigned("m1"), short_run, "unattended|999999|x")
    # Nothing may happen: wait for two heartbeats that the reconciler has handled.
    for _ in range(2):
        now = time.time()
        await eventually(lambda t=now: _later_heartbeat(client, names, t), timeout=5)
    assert (await client.get(short_run)).status is RunStatus.running
    await redis.hdel(names.machine_assigned("m1"), short_run)

    final = await client.wait(long_run, timeout=30)
    assert final.status is RunStatus.succeeded
    executions = [e["run_id"] for e in procs.executions()]
    assert executions.count(long_run) == 1 and executions.count(short_run) == 1


async def _status(client: Client, run_id: str, status: RunStatus) -> bool:
    run = await client.rt.runs.get(run_id)
    return run is not None and run.status is status


async def _later_heartbeat(client: Client, names: Names, after: float) -> bool:
    """True once m1 heartbeated again after ``after`` (the reconciler has seen the state)."""
    score = await client.rt.redis.zscore(names.heartbeat_index, "m1")
    return score is not None and float(score) > after
