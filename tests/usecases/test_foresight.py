"""Foresight over the use cases, in process: what the replica and the sweeper record, the
forecast chore's outlooks, and fail-early (only for runs that asked, only on enough history)."""

from __future__ import annotations

import asyncio
import json

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.core.trace import TraceRecord
from dispatcher.models import ConnectionKind, Mode, Priority, RunStatus, SessionState
from dispatcher.usecases.foresight import LEARN_CHUNK
from dispatcher.usecases.ports import Ack
from tests.support.builders import credentials, fleet, machine, request_payload, session
from tests.support.constants import ALICE_WIN
from tests.support.fakes import FakeDelivery
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


def bots() -> World:
    machines = (machine("m1", group_id="bots", slots=2),)
    connections = tuple(
        credentials(f"c{i}", group_id="bots", username=f"CONTOSO\\svc{i}") for i in (1, 2, 3)
    )
    return World(fleet(machines=machines, groups=("bots",), connections=connections))


def history(world: World, runs: int, flow: str = "slow", seconds: float = 10.0) -> None:
    """``runs`` finished runs of ``flow`` on m1, the last one finishing now."""
    now = world.clock.now
    for index in range(runs):
        end = now - (runs - 1 - index) * 0.1
        world.traces.records.setdefault(GROUP, []).append(
            TraceRecord(
                run_id=f"h{index}", target=GROUP, connection_id="c1",
                kind=ConnectionKind.credentials, mode=Mode.unattended, priority=Priority.normal,
                flow_id=flow, queued_at=end - seconds - 1, queue_deadline=end + 3600,
                status=RunStatus.succeeded, dispatched_at=end - seconds,
                started_at=end - seconds + 0.1, finished_at=end, machine_id="m1",
            )
        )  # fmt: skip


async def queue(world: World, run_id: str, connection: str, **fields: object) -> None:
    payload = request_payload(
        run_id=run_id, connection_id=connection, mode="unattended", flow_id="slow", **fields
    )
    await world.submit(payload)


async def saturated(world: World) -> None:
    """Both slots of m1 hold a slow run (just dispatched), a third slow run waits."""
    await world.heartbeat("m1")
    await queue(world, "a1", "c1")
    await queue(world, "a2", "c2")
    await world.place(GROUP)
    assert (await world.run("a1")).status is RunStatus.dispatched
    assert (await world.run("a2")).status is RunStatus.dispatched
    await queue(world, "a3", "c3")


async def test_fail_early_ends_only_the_run_that_asked_when_the_miss_is_certain() -> None:
    world = bots()
    history(world, 25)
    await saturated(world)
    await queue(world, "eager", "c1", queue_timeout_s=5, fail_early=True)
    await queue(world, "patient", "c2", queue_timeout_s=5)
    await queue(world, "in-time", "c3", fail_early=True)  # 6 h: it makes it
    outlooks = await world.foresight.chore_once()
    eager = await world.run("eager")
    assert eager.status is RunStatus.timed_out
    assert eager.error is not None and eager.error.code is ErrorCode.PredictedQueueTimeout
    assert eager.error.detail is not None and eager.error.detail["confidence"] == "high"
    assert [e["run_id"] for e in world.publisher.events("run.timed_out")] == ["eager"]
    assert (await world.run("patient")).status is RunStatus.queued
    assert (await world.run("in-time")).status is RunStatus.queued
    # The outlook counts the misses it saw (eager and patient), the earliest deadline first.
    assert outlooks[GROUP].predicted_timeouts == 2
    assert outlooks[GROUP].next_deadline_at == pytest.approx(eager.queue_deadline)
    assert world.traces.saved == outlooks


async def test_fail_early_never_acts_on_thin_history() -> None:
    world = bots()
    history(world, 19)  # the rule needs 20 effective samples of the kind
    await saturated(world)
    await queue(world, "eager", "c1", queue_timeout_s=5, fail_early=True)
    outlooks = await world.foresight.chore_once()
    assert (await world.run("eager")).status is RunStatus.queued
    assert outlooks[GROUP].predicted_timeouts >= 1  # predicted, but not sure enough to act


async def test_predictions_of_a_queue_and_of_a_run_no_machine_can_take() -> None:
    world = bots()
    history(world, 25)
    await saturated(world)
    await world.submit(request_payload(run_id="att", connection_id="c2", mode="attended"))
    forecast = await world.foresight.forecast(GROUP)
    by_id = {p.run_id: p for p in forecast.predictions}
    assert [run.run_id for run in forecast.runs] == ["a3", "att"]
    # a3 goes when the first slow run ends: 10 s after its dispatch (flow history).
    a3 = by_id["a3"]
    assert a3.outlook.value == "starts" and a3.start_at is not None
    assert a3.start_at - world.clock.now == pytest.approx(10.0, abs=0.5)
    att = by_id["att"]
    assert att.outlook.value == "no_machine" and att.start_at is None
    assert {m: c.value for m, c in att.reasons.items()} == {"m1": "AttendedUserNotLoggedIn"}
    assert await world.foresight.predict(await world.run("a1")) is None  # not queued


async def test_terminal_events_are_traced_and_a_broken_trace_store_changes_nothing_else() -> None:
    world = bots()
    replica = world.dispatcher()
    requested: list[str] = []
    replica.placer.request = lambda *targets: requested.extend(targets)  # type: ignore[method-assign]
    event = {
        "run_id": "r1", "status": "succeeded", "flow_id": "slow", "connection_id": "c1",
        "requested_by": "x@contoso.com", "mode": "unattended", "target": GROUP,
        "connection_kind": "credentials", "machine_id": "m1", "queued_at": 1.0,
        "queue_deadline": 100.0, "dispatched_at": 2.0, "started_at": 2.5, "finished_at": 9.0,
    }  # fmt: skip
    rejected = {**event, "run_id": "r2", "status": "rejected", "queued_at": None}
    deliveries = [
        FakeDelivery(json.dumps(event).encode(), routing_key="run.succeeded"),
        FakeDelivery(json.dumps(rejected).encode(), routing_key="run.failed"),
        FakeDelivery(b'{"status": 3}', routing_key="run.failed"),  # not a run: not traced
    ]
    assert await replica.handle_signals(deliveries) == [Ack(), Ack(), Ack()]
    [record] = world.traces.records[GROUP]
    assert (record.run_id, record.slot_time, record.waited) == ("r1", 7.0, 1.0)
    # The store breaks: the events are still acked, counted once, and the passes asked for.
    world.traces.broken = True
    requested.clear()
    completed = len(world.metrics.named("run_completed"))
    assert await replica.handle_signals(deliveries[:1]) == [Ack()]
    assert len(world.metrics.named("run_completed")) == completed + 1
    assert sorted(requested) == [GROUP, "m:m1"]  # a set: any order
    assert len(world.traces.records[GROUP]) == 1


async def test_machine_changes_are_recorded_when_a_machine_comes_changes_and_goes() -> None:
    world = bots()
    replica = world.dispatcher()
    await replica.handle_heartbeats([world_heartbeat(world)])
    await replica.handle_heartbeats([world_heartbeat(world)])  # nothing changed
    await replica.handle_heartbeats([world_heartbeat(world, active=True)])
    await queue(world, "handed", "c1")
    await world.place(GROUP)
    assert (await world.run("handed")).status is RunStatus.dispatched
    world.clock.advance(world.settings.offline_after_s + 1)
    world.traces.broken = True  # the offline machine's runs are requeued all the same
    await world.sweeper.check_liveness(world.clock.now)
    assert world.machines.offline == {"m1": world.clock.now}
    assert (await world.run("handed")).status is RunStatus.queued
    world.traces.broken = False
    changes = world.traces.machine_changes
    assert [(c.online, c.sessions) for c in changes] == [
        (True, ()),
        (True, ((ALICE_WIN, SessionState.active),)),
    ]
    # Back, then silent again: both recorded (the sweeper's with the last sessions it knew).
    await replica.handle_heartbeats([world_heartbeat(world, active=True)])
    assert changes[-1].online is True and len(changes) == 3
    world.clock.advance(world.settings.offline_after_s + 1)
    await world.sweeper.check_liveness(world.clock.now)
    assert changes[-1].online is False and changes[-1].sessions == ((ALICE_WIN, "active"),)
    assert changes[-1].at == world.clock.now


def world_heartbeat(world: World, *, active: bool = False) -> FakeDelivery:
    from dispatcher.models import Heartbeat

    beat = Heartbeat(
        machine_id="m1",
        worker_id="w1",
        sent_at=world.clock.now,
        sessions=(session(ALICE_WIN, "active"),) if active else (),
        public_key=world.keys["m1"].public_key_b64,
    )
    return FakeDelivery(beat.model_dump_json().encode(), routing_key="")


async def test_a_terminal_event_delivered_twice_is_learnt_once() -> None:
    world = bots()
    history(world, 3)
    world.traces.records[GROUP].append(world.traces.records[GROUP][-1])  # redelivered
    model = await world.foresight.model(GROUP)
    assert model.samples(ConnectionKind.credentials, world.clock.now) == pytest.approx(3, abs=0.01)
    world.traces.records[GROUP].append(world.traces.records[GROUP][0])  # much later, again
    model = await world.foresight.model(GROUP)
    assert model.samples(ConnectionKind.credentials, world.clock.now) == pytest.approx(3, abs=0.01)
    report = await world.foresight.capacity(GROUP, 0, since=0.0)
    assert report.recorded.runs == 3


async def test_a_long_trace_is_learnt_a_chunk_at_a_time_beside_the_rest_of_the_loop() -> None:
    """A replica's first forecast reads the whole trace: other work on its event loop (intake,
    placement, the workers' answers) gets turns while it learns, and every record is learnt."""
    world = bots()
    history(world, 4 * LEARN_CHUNK + 10)
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    before = turns
    model = await world.foresight.model(GROUP)
    during = turns - before
    ticker.cancel()
    assert during >= 4  # one turn at least after each full chunk
    learnt = await world.foresight.model(GROUP)  # nothing new: the same model, nothing repeated
    assert learnt is model
    records = world.traces.records[GROUP]
    assert world.foresight._learnt[GROUP].last_id == str(len(records) - 1)
    assert model.samples(ConnectionKind.credentials, records[-1].finished_at) > 0
