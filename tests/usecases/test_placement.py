"""Placement, in process: a pass over a target hands runs to machines, in queue order, with
skip-ahead, sealed secrets, one claim round trip and one publish window."""

from __future__ import annotations

import json

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.crypto import handoff_binding
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.models import Assignment, Machine, MachineView, RunStatus
from tests.support.builders import credentials, fleet, machine, request_payload, session
from tests.support.constants import ALICE_WIN
from tests.support.world import World

pytestmark = pytest.mark.unit

GROUP = "g:bots"


def bots(*machines: Machine) -> World:
    machines = machines or (machine("m1", group_id="bots"), machine("m2", group_id="bots"))
    connections = (
        *(credentials(f"c{i}", group_id="bots", username=f"CONTOSO\\svc{i}") for i in range(1, 6)),
        credentials("att", group_id="bots", username=ALICE_WIN),
    )
    return World(fleet(machines=machines, groups=("bots",), connections=connections))


async def queue(world: World, run_id: str, connection: str = "c1", **fields: object) -> None:
    mode = "attended" if connection == "att" else "unattended"
    await world.submit(
        request_payload(run_id=run_id, connection_id=connection, mode=mode, **fields)
    )
    world.clock.advance(1)


async def test_a_run_goes_to_the_least_loaded_machine_with_its_secret_sealed_to_it() -> None:
    world = bots(machine("m1", group_id="bots", slots=2), machine("m2", group_id="bots", slots=2))
    await world.heartbeat("m1")
    await world.heartbeat("m2")
    await queue(world, "r1", "c1")
    assert await world.place(GROUP) == 1
    first = (await world.run("r1")).machine_id
    await queue(world, "r2", "c2")
    assert await world.place(GROUP) == 1
    second = await world.run("r2")
    assert {first, second.machine_id} == {"m1", "m2"}
    assert second.status is RunStatus.dispatched and second.fence == 2
    assign = world.publisher.of_kind("assign")[-1]
    assignment = Assignment.model_validate_json(assign.body)
    assert assign.routing_key == second.machine_id == assignment.machine_id
    assert (assignment.run_id, assignment.fence, assignment.user) == ("r2", 2, "CONTOSO\\svc2")
    binding = handoff_binding("r2", assignment.machine_id, 2, assignment.flow_id, assignment.inputs)
    opened = world.keys[assignment.machine_id].open(assignment.sealed_secret or "", binding)
    assert json.loads(opened) == {
        "kind": "password",
        "username": "CONTOSO\\svc2",
        "password": "password-of-c2",
    }
    assert world.metrics.named("run_dispatched")[-1] == (GROUP, "credentials", "unattended")
    assert world.metrics.named("queue_wait")[-1] == (1.0, GROUP, "credentials")


async def test_a_pass_places_what_the_machines_can_take_and_publishes_one_window() -> None:
    world = bots()
    await world.heartbeat("m1")
    await world.heartbeat("m2")
    for i in range(1, 5):
        await queue(world, f"r{i}", f"c{i}")
    before = len(world.publisher.windows)
    assert await world.place(GROUP) == 2
    statuses = [(await world.run(f"r{i}")).status for i in range(1, 5)]
    assert statuses == [RunStatus.dispatched] * 2 + [RunStatus.queued] * 2
    assert len(world.publisher.windows) == before + 1
    kinds = sorted((m.kind, m.routing_key) for m in world.publisher.windows[-1])
    assert kinds == sorted(
        [("event", "run.dispatched.-")] * 2 + [("assign", "m1"), ("assign", "m2")]
    )


async def test_a_high_priority_run_goes_first() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")
    await queue(world, "normal", "c1")
    await queue(world, "urgent", "c2", priority="high")
    await world.place(GROUP)
    assert (await world.run("urgent")).status is RunStatus.dispatched
    assert (await world.run("normal")).status is RunStatus.queued


async def test_a_head_that_cannot_be_placed_does_not_block_the_runs_behind_it() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")  # nobody signed in: the attended run must wait
    await queue(world, "waits", "att")
    await queue(world, "goes", "c1")
    assert await world.place(GROUP) == 1
    assert (await world.run("goes")).status is RunStatus.dispatched
    waiting = await world.run("waits")
    assert waiting.status is RunStatus.queued
    assert waiting.timeline[-1].event == "waiting"
    reasons = await world.store.lane_reasons(GROUP, "att|attended|normal")
    assert reasons is not None and reasons["machines"] == {"m1": "AttendedUserNotLoggedIn"}


async def test_the_reasons_of_an_offline_machine_say_since_when() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1", session(ALICE_WIN, "active"))
    world.clock.advance(world.settings.offline_after_s + 5)
    await queue(world, "r1", "att")
    await world.place(GROUP)
    reasons = await world.store.lane_reasons(GROUP, "att|attended|normal")
    assert reasons is not None
    assert reasons["machines"]["m1"].startswith("MachineOffline since 2027-")


async def test_unchanged_reasons_are_not_written_again_at_every_pass() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")
    await queue(world, "r1", "att")
    await world.place(GROUP)
    await world.place(GROUP)
    world.clock.advance(1)
    await world.place(GROUP)
    assert [e.event for e in (await world.run("r1")).timeline] == ["queued", "waiting"]


async def test_a_permanent_secret_failure_fails_the_run_and_the_next_run_gets_a_pass() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")
    await queue(world, "r1", "c1")
    world.passwords.failure = RunFailure(
        ErrorCode.SecretNotFound, "no such secret", detail={"vault": "v1"}
    )
    world.placer.request = world.passes.request  # type: ignore[method-assign]
    world.passes.requested.clear()
    assert await world.place(GROUP) == 0
    run = await world.run("r1")
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code is ErrorCode.SecretNotFound
    assert (run.error.message, run.error.detail) == ("no such secret", {"vault": "v1"})
    assert (run.timeline[-1].event, run.timeline[-1].detail) == (
        "failed",
        {"code": "SecretNotFound"},
    )
    assert [e["run_id"] for e in world.publisher.events("run.failed")] == ["r1"]
    assert world.passes.requested == [GROUP]


async def test_a_transient_secret_failure_keeps_the_run_waiting() -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")
    await queue(world, "r1", "c1")
    world.passwords.failure = RetryableRunError(ErrorCode.VaultUnavailable, "busy")
    assert await world.place(GROUP) == 0
    assert (await world.run("r1")).status is RunStatus.queued
    reasons = await world.store.lane_reasons(GROUP, "c1|unattended|normal")
    assert reasons is not None and reasons["machines"] == {"m1": "VaultUnavailable (retrying)"}


@pytest.mark.parametrize(
    ("second", "lost_to"),
    [("c1", "the same user's run"), ("c2", "the machine's only slot")],
)
async def test_a_claim_that_loses_a_race_asks_for_another_pass(second: str, lost_to: str) -> None:
    slots = 2 if second == "c1" else 1
    world = bots(machine("m1", group_id="bots", slots=slots))
    await world.heartbeat("m1")
    await queue(world, "r1", "c1")
    await world.place(GROUP)  # r1 occupies m1 now
    await queue(world, "r2", second)
    real_views = world.machines.views

    async def stale_views(*args: object, **kwargs: object) -> list[MachineView]:
        # What another replica's pass saw a moment ago: m1 still empty.
        views = await real_views(*args, **kwargs)  # type: ignore[arg-type]
        return [view.model_copy(update={"assigned": ()}) for view in views]

    world.machines.views = stale_views  # type: ignore[method-assign]
    world.placer.request = world.passes.request  # type: ignore[method-assign]
    world.passes.requested.clear()
    assert await world.place(GROUP) == 0, f"planned on m1, refused: {lost_to} is taken"
    assert (await world.run("r2")).status is RunStatus.queued
    assert world.passes.requested == [GROUP]


async def test_a_pass_that_read_a_full_lane_asks_for_another_and_one_that_did_not_does_not() -> (
    None
):
    world = bots(machine("m1", group_id="bots", slots=2))
    await world.heartbeat("m1")
    asked: list[str] = []
    world.placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    await queue(world, "only", "c1")
    assert await world.place(GROUP) == 1
    assert asked == []  # the lane was read to its end: nothing more to place
    for run_id in ("a", "b", "c"):
        await queue(world, run_id, "c2")
    # Room for one more run (two slots, one taken): one run of the lane read, the lane is longer.
    assert await world.place(GROUP) == 1
    assert asked == [GROUP]


async def test_a_lane_waiting_for_a_session_is_read_by_its_head_until_it_moves() -> None:
    world = bots(machine("m1", group_id="bots", slots=3))
    await world.heartbeat("m1")  # nobody signed in: the attended runs wait
    for run_id in ("a1", "a2", "a3"):
        await queue(world, run_id, "att")
    read: list[tuple[int, set[str]]] = []
    members = world.placer.runs.lane_members

    async def spy(target: str, lanes: list[str], per_lane: int, heads_only: object = ()):  # type: ignore[no-untyped-def]
        found = await members(target, lanes, per_lane, heads_only)  # type: ignore[arg-type]
        read.append((sum(len(m) for m in found.values()), set(heads_only)))  # type: ignore[call-overload]
        return found

    world.placer.runs.lane_members = spy  # type: ignore[method-assign]
    assert await world.place(GROUP) == 0
    assert await world.place(GROUP) == 0
    assert read == [(3, set()), (1, {"att|attended|normal"})]  # the second pass: the head only
    asked: list[str] = []
    world.placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    await world.heartbeat("m1", session(ALICE_WIN, "active"))
    assert await world.place(GROUP) == 1  # the head, read alone, goes; another pass is asked
    assert asked == [GROUP]
    assert (await world.run("a1")).status is RunStatus.dispatched
    assert read[-1] == (1, {"att|attended|normal"})


async def test_a_pass_places_at_most_its_cap_and_asks_for_another() -> None:
    from dispatcher.core import placement as core_placement

    cap = core_placement.MAX_PLACEMENTS
    machines = tuple(machine(f"m{i}", group_id="bots", slots=4) for i in range(cap // 4 + 2))
    connections = tuple(
        credentials(f"k{i}", group_id="bots", username=f"CONTOSO\\bulk{i}") for i in range(cap + 5)
    )
    world = World(fleet(machines=machines, groups=("bots",), connections=connections))
    for c in connections:
        await queue(world, f"run-{c.connection_id}", c.connection_id)
    for m in machines:
        await world.heartbeat(m.machine_id)
    asked: list[str] = []
    world.placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    assert await world.place(GROUP) == cap
    assert asked == [GROUP]
    asked.clear()
    assert await world.place(GROUP) == 5
    assert asked == []


@pytest.mark.parametrize(
    ("submitted_at", "waited"),
    [(None, 1.0), (1_000.0, 0.0)],  # no submit time: since queued; a future one: not negative
)
async def test_the_queue_wait_metric(submitted_at: float | None, waited: float) -> None:
    world = bots(machine("m1", group_id="bots"))
    await world.heartbeat("m1")
    if submitted_at is not None:
        submitted_at += world.clock.now
    await queue(world, "r1", "c1", submitted_at=submitted_at)
    await world.place(GROUP)
    assert world.metrics.named("queue_wait") == [(waited, GROUP, "credentials")]
