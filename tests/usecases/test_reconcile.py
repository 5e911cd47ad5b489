"""Reconcile, in process: a worker's heartbeat repairs a start or an outcome the store lost,
never a run that belongs to another machine or fencing token."""

from __future__ import annotations

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.models import FinishedRef, Heartbeat, RunningRef, RunStatus
from dispatcher.usecases.ports import Start
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


async def test_a_report_never_moves_a_run_of_another_token_or_machine() -> None:
    world = await dispatched("r1")
    fence = (await world.run("r1")).fence
    assert fence is not None
    reports = [
        heartbeat(running=(("r1", fence + 1),)),
        heartbeat(machine_id="m2", running=(("r1", fence),)),
        heartbeat(machine_id="m2", finished=(("r1", fence, "succeeded", None),)),
        heartbeat(finished=(("r1", fence + 1, "succeeded", None),)),
        heartbeat(),
    ]
    for report in reports:
        assert await world.reconciler.heartbeat(report) == 0
    assert (await world.run("r1")).status is RunStatus.dispatched
    assert world.publisher.events("run.started") == []
