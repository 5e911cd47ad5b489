"""Redis losing its last writes (a host crash inside AOF's window, a failover to a lagging
replica): the dispatcher repairs the lost start or outcome from what the worker reports, and
never moves a run that belongs to another token; when the claim was lost too (the run is back
in its queue), the worker's report wins: the run is recorded running where it runs, and it
runs exactly once."""

from __future__ import annotations

import sys
import time
from pathlib import Path
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
from tests.support.e2e import acli, in_status
from tests.support.processes import (
    Processes,
    eventually,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

GATED_FLOW = f"{sys.executable} {Path(__file__).parents[1] / 'e2e' / 'gated_flow.py'}"


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


@pytest.mark.parametrize("held", ["queued", "handed-off-again"])
async def test_a_lost_claim_and_start_are_repaired_and_the_run_runs_once(
    client: Client,
    settings: Settings,
    procs: Processes,
    apply_fleet: Any,
    tmp_path: Path,
    held: str,
) -> None:
    """queued: the machine is in maintenance, so the run waits in its queue until the
    worker's heartbeat; handed-off-again: the run is claimed again at once (for the same
    machine, under a new fence) and the worker refuses the new assignment (it ran it)."""
    # The fence counter lost the claim's increment too, in the first case.
    document = fleet()
    document["machines"][0]["max_unattended_runs"] = 1
    apply_fleet(document)
    procs.dispatcher()
    procs.worker("m1", executor="command", extra=["--command", GATED_FLOW])
    names = Names(settings.namespace)
    release = tmp_path / "release"
    run_id = await client.submit(
        connection_id="c1",
        flow_id="f",
        requested_by=OWNER,
        mode="unattended",
        inputs={"release_file": str(release)},
    )
    running = await in_status(client, run_id, RunStatus.running, timeout=30)
    assert running.fence is not None
    if held == "queued":
        await acli(procs, "machines", "maintenance", "m1", "on")
    await lose_claim_and_start(client, names, run_id, running.fence, rollback=held == "queued")

    repaired = await eventually(lambda: _adopted(client, run_id, running.fence), timeout=20)
    assert repaired.machine_id == "m1"
    assert any((e.detail or {}).get("reconciled") for e in repaired.timeline)
    assert await client.rt.redis.hget(names.machine_assigned("m1"), run_id) is not None
    assert int(await client.rt.redis.get(names.fence) or 0) >= running.fence
    release.touch()
    final = await client.wait(run_id, timeout=30)
    assert final.status is RunStatus.succeeded, final.error
    assert final.fence == running.fence
    assert [e["run_id"] for e in procs.executions()] == [run_id]
    assert await client.rt.redis.hget(names.machine_assigned("m1"), run_id) is None


async def lose_claim_and_start(
    client: Client,
    names: Names,
    run_id: str,
    fence: int,
    *,
    rollback: bool,
    machine_id: str = "m1",
) -> None:
    """What Redis holds if it lost the claim and the start of a running run: the run back in
    its queue at its old place, no machine or fence, the machine's slot free (``rollback``:
    and the fence counter back to before the claim)."""
    redis = client.rt.redis
    run = await client.rt.runs.get(run_id)
    assert run is not None and run.target is not None
    key = names.run(run_id)
    score, lane, deadline = await redis.hmget(key, ["_score", "_lane", "queue_deadline"])
    lane = lane.decode().strip('"')
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, "status", '"queued"')
        pipe.hdel(key, "machine_id", "fence", "dispatched_at", "started_at", "_worker")
        pipe.hdel(names.machine_assigned(machine_id), run_id)
        pipe.zrem(names.running_deadlines, run_id)
        pipe.zadd(names.queue(run.target), {run_id: float(score)})
        pipe.zadd(names.lane(run.target, lane), {run_id: float(score)})
        pipe.zadd(names.lanes(run.target), {lane: float(score)})
        pipe.zadd(names.queue_deadlines, {run_id: float(deadline)})
        pipe.sadd(names.targets, run.target)
        if rollback:
            pipe.set(names.fence, fence - 1)
        await pipe.execute()


async def _adopted(client: Client, run_id: str, fence: int) -> Any:
    run = await client.rt.runs.get(run_id)
    ok = run is not None and run.status is RunStatus.running and run.fence == fence
    return run if ok else None
