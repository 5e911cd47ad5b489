"""Reconcile, in process: a worker's heartbeat repairs a start or an outcome the store lost,
never a run that belongs to another machine or fencing token."""

from __future__ import annotations

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.models import FinishedRef, Heartbeat, RunningRef, RunStatus
from dispatcher.usecases.ports import Start
from dispatcher.usecases.results import Refused
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = pytest.mark.unit


async def dispatched(*run_ids: str) -> World:
    machines = (machine("m1", slots=3), machine("m2", slots=3))
    connections = tuple(
        credentials(f"c{i}", machine_id="m1", username=f"CONTOSO\\svc{i}") for i in (1, 2, 3)
    )
    world = World(fleet(machines=machines, connections=connections))
    await world.heartbeat("m1")
    for index, run_id in enumerate(run_ids, start=1):
        await world.submit(
            request_payload(run_id=run_id, connection_id=f"c{index}", mode="unattended")
        )
    await world.place("m:m1")
    return world


def heartbeat(
    machine_id: str = "m1",
    running: tuple[tuple[str, int], ...] = (),
    finished: tuple[tuple[str, int, str, str | None], ...] = (),
) -> Heartbeat:
    return Heartbeat(
        machine_id=machine_id,
        worker_id="worker-9",
        sent_at=0.0,
        running=tuple(RunningRef(run_id=r, fence=f) for r, f in running),
        finished=tuple(
            FinishedRef(run_id=r, fence=f, status=s, code=c)  # type: ignore[arg-type]
            for r, f, s, c in finished
        ),
    )


async def test_a_lost_start_is_recorded_from_the_heartbeat() -> None:
    world = await dispatched("r1")
    fence = (await world.run("r1")).fence
    assert fence is not None
    assert await world.reconciler.heartbeat(heartbeat(running=(("r1", fence),))) == 1
    run = await world.run("r1")
    assert run.status is RunStatus.running
    assert world.store.runs["r1"]["_worker"] == '"worker-9"'
    assert world.store.running["r1"] == world.clock.now + 600 + 60
    assert [e["run_id"] for e in world.publisher.events("run.started")] == ["r1"]


async def test_lost_outcomes_are_recorded_from_the_heartbeat() -> None:
    world = await dispatched("ok", "bad")
    ok, bad = (await world.run("ok")).fence, (await world.run("bad")).fence
    assert ok is not None and bad is not None
    start = Start("ok", ok, world.clock.now + 600, "m1", "worker-9")
    await world.store.start_many([start], world.clock.now)
    reported = heartbeat(
        finished=(
            ("ok", ok, "succeeded", None),
            ("bad", bad, "failed", "DesktopFlowsActionTimeout"),
        )
    )
    assert await world.reconciler.heartbeat(reported) == 2
    succeeded, failed = await world.run("ok"), await world.run("bad")
    assert succeeded.status is RunStatus.succeeded
    assert succeeded.timeline[-1].detail == {"reconciled": True}
    assert failed.status is RunStatus.failed
    assert failed.error is not None and failed.error.code is ErrorCode.DesktopFlowsActionTimeout


async def test_an_outcome_never_moves_a_run_of_another_token_or_machine() -> None:
    world = await dispatched("r1")
    fence = (await world.run("r1")).fence
    assert fence is not None
    reports = [
        heartbeat(machine_id="m2", finished=(("r1", fence, "succeeded", None),)),
        heartbeat(finished=(("r1", fence + 1, "succeeded", None),)),
        heartbeat(),
    ]
    for report in reports:
        assert await world.reconciler.heartbeat(report) == 0
    assert (await world.run("r1")).status is RunStatus.dispatched
    assert world.publisher.events("run.started") == []


async def test_a_lost_claim_and_start_are_recorded_from_the_heartbeat() -> None:
    world = await dispatched("r1")
    run = await world.run("r1")
    assert run.fence is not None
    # Redis lost the claim and the start: the run is back in its queue, m1's slot free.
    await world.store.requeue(run, reason="lost", now=world.clock.now)
    assert (await world.run("r1")).status is RunStatus.queued
    world.store.fence = run.fence - 1  # the fence counter went back too
    report = heartbeat(running=(("r1", run.fence),))
    assert await world.reconciler.heartbeat(report, world.fleet.cached()) == 1
    adopted = await world.run("r1")
    assert (adopted.status, adopted.machine_id, adopted.fence) == (
        RunStatus.running,
        "m1",
        run.fence,
    )
    assert "r1" not in world.store.queues.get(adopted.target or "", {})
    assert "r1" in world.store.assigned["m1"]  # its slot is taken
    assert world.store.fence >= run.fence  # no later hand-off re-uses the fence
    assert adopted.timeline[-1].detail == {"machine_id": "m1", "reconciled": True}
    assert await world.reconciler.heartbeat(report, world.fleet.cached()) == 0  # once


async def test_a_report_wins_over_a_new_hand_off_whose_start_is_then_refused() -> None:
    world = await dispatched("r1")
    fence = (await world.run("r1")).fence
    assert fence is not None
    # m2 runs r1 under the fence the store issued before it lost the claim and the start;
    # the store handed r1 to m1 since, under the same (re-used) fence.
    assert await world.reconciler.heartbeat(heartbeat("m2", running=(("r1", fence),))) == 1
    run = await world.run("r1")
    assert (run.status, run.machine_id, run.fence) == (RunStatus.running, "m2", fence)
    assert "r1" not in world.store.assigned.get("m1", {})
    async with world.lifecycle.window() as window:
        [result] = await window.start_many([Start("r1", fence, 1e12, "m1", "w-m1")], 0.0)
    assert isinstance(result, Refused)
    # A run another machine has started is not moved by a report.
    assert await world.reconciler.heartbeat(heartbeat(running=(("r1", fence + 1),))) == 0
    assert (await world.run("r1")).machine_id == "m2"
