"""The sweeper, in process: queue deadlines, machine liveness, overdue runs, the outbox relay."""

from __future__ import annotations

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.models import RunStatus
from dispatcher.usecases.ports import Start
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


def bots() -> World:
    machines = (machine("m1", group_id="bots", slots=2),)
    connections = tuple(
        credentials(f"c{i}", group_id="bots", username=f"CONTOSO\\svc{i}") for i in (1, 2, 3)
    )
    world = World(fleet(machines=machines, groups=("bots",), connections=connections))
    return world


async def queue(world: World, run_id: str, connection: str = "c1", **fields: object) -> None:
    await world.submit(
        request_payload(run_id=run_id, connection_id=connection, mode="unattended", **fields)
    )
    world.clock.advance(1)


async def start(world: World, run_id: str, machine_id: str = "m1") -> None:
    run = await world.run(run_id)
    assert run.fence is not None
    begun = Start(run_id, run.fence, world.clock.now + 600, machine_id, "worker-1")
    await world.store.start_many([begun], world.clock.now)


async def test_a_run_still_queued_at_its_deadline_times_out_with_the_last_reasons() -> None:
    world = bots()
    await queue(world, "late", queue_timeout_s=30)
    await queue(world, "patient")
    await world.place(GROUP)  # m1 never heartbeated: both wait, with reasons
    world.clock.advance(30)
    assert await world.sweeper.expire_deadlines(world.clock.now) == 1
    run = await world.run("late")
    assert run.status is RunStatus.timed_out
    assert run.error is not None and run.error.code is ErrorCode.NoCandidateMachine
    assert run.error.detail == {"reasons": {"m1": "MachineOffline (never seen)"}}
    assert [e["run_id"] for e in world.publisher.events("run.timed_out")] == ["late"]
    assert (await world.run("patient")).status is RunStatus.queued


async def test_a_silent_machine_gives_back_its_unstarted_runs_then_fails_its_running_ones() -> None:
    world = bots()
    await world.heartbeat("m1")
    await queue(world, "started", "c1")
    await queue(world, "handed", "c2")
    await queue(world, "behind", "c3")
    await world.place(GROUP)
    await start(world, "started")
    world.passes.requested.clear()
    world.clock.advance(world.settings.offline_after_s + 1)
    await world.sweeper.check_liveness(world.clock.now)
    assert world.machines.offline == {"m1": world.clock.now}
    assert (await world.run("handed")).status is RunStatus.queued
    assert (await world.run("started")).status is RunStatus.running
    page = [run_id for run_id, _ in await world.store.queue_page(GROUP, 0, -1)]
    assert page == ["handed", "behind"]  # back at its old position
    assert world.passes.requested == [GROUP]
    world.clock.advance(world.settings.running_grace_s)
    await world.sweeper.check_liveness(world.clock.now)
    lost = await world.run("started")
    assert lost.status is RunStatus.failed
    assert lost.error is not None and lost.error.code is ErrorCode.MachineLost
    assert await world.machines.assigned("m1") == []


async def test_no_machine_is_judged_on_heartbeats_missed_while_the_store_was_away() -> None:
    world = bots()
    await world.heartbeat("m1")
    world.clock.advance(world.settings.offline_after_s - 1)
    world.sweeper._reachable_since = world.clock.now  # the store just came back
    world.clock.advance(2)
    await world.sweeper.check_liveness(world.clock.now)
    assert world.machines.offline == {}


async def test_a_run_running_long_past_its_limit_fails() -> None:
    world = bots()
    await world.heartbeat("m1")
    await queue(world, "r1")
    await world.place(GROUP)
    await start(world, "r1")
    await world.sweeper.fail_overdue(world.clock.now + 599)
    assert (await world.run("r1")).status is RunStatus.running
    await world.sweeper.fail_overdue(world.clock.now + 600)
    run = await world.run("r1")
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code is ErrorCode.DesktopFlowsActionTimeout


async def test_a_sweep_relays_what_was_recorded_but_not_published_and_asks_for_passes() -> None:
    world = bots()
    world.publisher.down = True
    await queue(world, "r1")
    assert world.publisher.sent == [] and len(world.store.outbox) == 1
    world.publisher.down = False
    world.passes.requested.clear()
    await world.sweeper.sweep_once()
    assert [e["run_id"] for e in world.publisher.events("run.queued")] == ["r1"]
    assert world.store.outbox == {}
    assert world.passes.requested == [GROUP]


async def test_a_run_an_online_machine_never_started_goes_back_to_its_queue() -> None:
    world = bots()
    await world.heartbeat("m1")
    await queue(world, "lost", "c1")  # its assignment never reaches the worker
    await queue(world, "started", "c2")
    await queue(world, "behind", "c3")
    await world.place(GROUP)
    await start(world, "started")
    assert (await world.run("lost")).status is RunStatus.dispatched
    world.passes.requested.clear()
    world.clock.advance(world.settings.start_timeout_s - 1)
    await world.heartbeat("m1")  # the machine keeps heartbeating
    assert await world.sweeper.requeue_unstarted(world.clock.now) == 0
    world.clock.advance(2)
    await world.heartbeat("m1")
    assert await world.sweeper.requeue_unstarted(world.clock.now) == 1
    lost = await world.run("lost")
    assert lost.status is RunStatus.queued and lost.fence is None
    page = [run_id for run_id, _ in await world.store.queue_page(GROUP, 0, -1)]
    assert page == ["lost", "behind"]  # back at its old position
    assert world.passes.requested == [GROUP]
    assert (await world.run("started")).status is RunStatus.running
    assert [a.run_id for a in await world.machines.assigned("m1")] == ["started"]
