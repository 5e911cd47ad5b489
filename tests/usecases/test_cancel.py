"""Cancel, in process: a run is cancelled wherever it is, and a running one is stopped by its
worker through the outbox like every other message."""

from __future__ import annotations

import json

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.errors import NotFound
from dispatcher.models import Run, RunStatus
from dispatcher.usecases.ports import Start
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = pytest.mark.unit


async def world_with(*run_ids: str) -> World:
    machines = (machine("m1", slots=3),)
    connections = tuple(
        credentials(f"c{i}", machine_id="m1", username=f"CONTOSO\\svc{i}") for i in (1, 2, 3)
    )
    world = World(fleet(machines=machines, connections=connections))
    for index, run_id in enumerate(run_ids, start=1):
        await world.submit(
            request_payload(run_id=run_id, connection_id=f"c{index}", mode="unattended")
        )
    return world


async def test_a_queued_run_is_cancelled_and_leaves_its_queue() -> None:
    world = await world_with("r1")
    run = await world.canceller.cancel("r1", "not needed")
    assert run.status is RunStatus.cancelled
    assert run.error is not None and run.error.code is ErrorCode.Cancelled
    assert run.error.message == "not needed"
    assert run.timeline[-1].detail == {"reason": "not needed"}
    assert await world.store.queue_page("m:m1", 0, -1) == []
    assert [e["run_id"] for e in world.publisher.events("run.cancelled")] == ["r1"]


async def test_a_dispatched_run_is_cancelled_and_its_slot_freed() -> None:
    world = await world_with("r1")
    await world.heartbeat("m1")
    await world.place("m:m1")
    run = await world.canceller.cancel("r1", "changed my mind")
    assert run.status is RunStatus.cancelled
    assert await world.machines.assigned("m1") == []
    assert [e["run_id"] for e in world.publisher.events("run.cancelled")] == ["r1"]


async def test_a_running_run_is_marked_and_its_worker_told_through_the_outbox() -> None:
    world = await world_with("r1")
    await world.heartbeat("m1")
    await world.place("m:m1")
    fence = (await world.run("r1")).fence
    assert fence is not None
    start = Start("r1", fence, world.clock.now + 600, "m1", "worker-1")
    await world.store.start_many([start], world.clock.now)
    run = await world.canceller.cancel("r1", "stop it")
    assert run.status is RunStatus.running and run.cancel_requested
    cancels = world.publisher.of_kind("cancel")
    assert [m.routing_key for m in cancels] == ["m1"]
    assert json.loads(cancels[0].body) == {"run_id": "r1", "fence": fence, "reason": "stop it"}
    assert [m for m in world.store.outbox.values() if m.kind == "cancel"] == []  # published


async def test_a_finished_run_stays_as_it_is() -> None:
    world = await world_with("r1")
    await world.canceller.cancel("r1", "first")
    windows = len(world.publisher.windows)
    run = await world.canceller.cancel("r1", "second")
    assert run.error is not None and run.error.message == "first"
    assert len(world.publisher.windows) == windows


async def test_an_unknown_run_cannot_be_cancelled() -> None:
    world = await world_with()
    with pytest.raises(NotFound):
        await world.canceller.cancel("nope", "x")


async def test_a_run_that_moved_since_it_was_read_is_read_again() -> None:
    world = await world_with("r1")
    stale = await world.run("r1")  # queued, as the canceller will first see it
    await world.heartbeat("m1")
    await world.place("m:m1")  # meanwhile dispatched
    reads = iter([stale])
    real_get = world.store.get

    async def get(run_id: str) -> Run | None:
        return next(reads, None) or await real_get(run_id)

    world.canceller.runs.get = get  # type: ignore[method-assign]
    run = await world.canceller.cancel("r1", "late")
    assert run.status is RunStatus.cancelled
    assert await world.machines.assigned("m1") == []
