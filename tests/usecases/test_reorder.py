"""Reordering a queued run through the lifecycle, in process: its priority, score, lane and
timeline change together; a run that left the queue is a conflict."""

from __future__ import annotations

import pytest

from dispatcher.models import Priority, RunStatus
from dispatcher.usecases.results import Conflict, Reordered
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


def bots() -> World:
    connections = tuple(credentials(f"c{i}", group_id="bots") for i in (1, 2))
    return World(fleet(machines=(machine("m1", group_id="bots"),), groups=("bots",),
                       connections=connections))  # fmt: skip


async def test_a_reorder_changes_priority_score_lane_and_timeline_at_once() -> None:
    world = bots()
    for run_id, connection in (("first", "c1"), ("second", "c2")):
        await world.submit(
            request_payload(run_id=run_id, connection_id=connection, mode="unattended")
        )
        world.clock.advance(1)
    second = await world.run("second")
    async with world.lifecycle.window() as window:
        result = await window.reorder(
            second, score=1.0, priority=Priority.high, event="priority_changed", now=123.0
        )
    assert result == Reordered()
    assert [r for r, _ in await world.store.queue_page(GROUP, 0, -1)] == ["second", "first"]
    assert await world.store.score_of("second") == 1.0
    lanes = await world.store.lane_names(GROUP)
    assert "c2|unattended|high" in lanes and "c2|unattended|normal" not in lanes
    moved = await world.run("second")
    assert moved.priority is Priority.high
    last = moved.timeline[-1]
    assert (last.event, last.at, last.detail) == ("priority_changed", 123.0, {"priority": "high"})
    await world.canceller.cancel("first", "gone")
    gone = await world.run("first")
    assert gone.status is RunStatus.cancelled
    async with world.lifecycle.window() as window:
        late = await window.reorder(
            gone, score=0.0, priority=Priority.high, event="moved_to_top", now=124.0
        )
    assert late == Conflict(status=RunStatus.cancelled)


async def test_a_requeue_through_the_lifecycle_says_why() -> None:
    world = bots()
    await world.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
    await world.heartbeat("m1")
    assert await world.place(GROUP) == 1
    dispatched = await world.run("r1")
    async with world.lifecycle.window() as window:
        await window.requeue(dispatched, reason="machine offline", now=world.clock.now)
    run = await world.run("r1")
    assert run.status is RunStatus.queued
    assert run.timeline[-1].event == "requeued"
    assert run.timeline[-1].detail == {"reason": "machine offline", "machine_id": "m1"}
