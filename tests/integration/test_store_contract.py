"""The run store's contract, on the real Redis adapter and on the in-memory fake.

Each scenario drives the transitions and reads through the ports and checks what the contract
promises (the typed results); it runs once per store (parametrized fixture). Then
``test_the_fake_answers_what_redis_answers`` runs every scenario on both and compares the whole
trace: every result (outbox messages included, their JSON bodies parsed), every record read
back. The in-process tests of the use cases can trust the fake because this test passes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from dispatcher.adapters.redis.connection import delete_namespace, make_redis
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.adapters.redis.reads import RedisRunReads
from dispatcher.adapters.redis.transitions import RedisTransitions
from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.models import (
    Assignment,
    ConnectionKind,
    Mode,
    Priority,
    QueuedHead,
    RunError,
    RunStatus,
)
from dispatcher.names import Names
from dispatcher.usecases.ports import (
    Admission,
    Adoption,
    Claim,
    Ending,
    HandoffFacts,
    MachineState,
    QueueEnding,
    Refusal,
    RunReads,
    RunTransitions,
    Start,
)
from dispatcher.usecases.results import (
    CancelRequested,
    Claimed,
    Conflict,
    Duplicate,
    Finished,
    Missing,
    NoSlot,
    NotDue,
    NotQueued,
    Queued,
    Refused,
    Rejected,
    Reordered,
    Requeued,
    Stale,
    Started,
    Unqueued,
    UserBusy,
)
from tests.support.builders import request
from tests.support.fakes import FakeMachines, FakeRunStore
from tests.support.processes import new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOW = 1_800_000_000.0
HOUR = 3600.0


@dataclass
class Store:
    """One run store, through its ports."""

    transitions: RunTransitions
    reads: RunReads
    machines: MachineState


@asynccontextmanager
async def open_store(kind: str) -> AsyncIterator[Store]:
    if kind == "fake":
        fake = FakeRunStore(new_settings().retention_s)
        yield Store(fake, fake, FakeMachines(fake))
        return
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    try:
        yield Store(
            RedisTransitions(redis, names, settings.retention_s),
            RedisRunReads(redis, names),
            RedisMachines(redis, names),
        )
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


@pytest.fixture(params=["redis", "fake"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with open_store(request.param) as opened:
        yield opened


# ---- what the scenarios build -----------------------------------------------------------------
def admission(
    run_id: str,
    *,
    connection: str = "c1",
    mode: str = "unattended",
    target: str = "g:bots",
    at: float = NOW,
    deadline: float = NOW + HOUR,
    throttle: int = 100,
    cap: int = 100,
    priority: str = "normal",
) -> Admission:
    req = request(
        run_id=run_id,
        connection_id=connection,
        mode=mode,
        priority=priority,
        submitted_at=at - 1,
        inputs={"n": run_id},
    )
    score = at - (HOUR if priority == "high" else 0.0)
    return Admission(req, target, ConnectionKind.credentials, score, deadline, throttle, cap, at)


def claim(run_id: str, *, connection: str = "c1", mode: str = "unattended", machine: str = "m1",
          user: str = "CONTOSO\\Svc1", slots: int = 1, score: float = NOW,
          fence: int = 1) -> Claim:  # fmt: skip
    head = QueuedHead(run_id, score, lane_of(connection, mode, "normal"))
    kind = ConnectionKind.credentials
    return Claim(head, "g:bots", machine, user, kind, 600.0, "sx1.k.s", slots, fence)


def start(run_id: str, fence: int, machine: str = "m1") -> Start:
    return Start(run_id, fence, NOW + HOUR, machine, "worker-1")


def ending(run_id: str, fence: int | None, status: RunStatus = RunStatus.succeeded,
           allowed: tuple[RunStatus, ...] = (RunStatus.running,),
           machine: str = "m1") -> Ending:  # fmt: skip
    error = (
        None if status is RunStatus.succeeded else RunError(code=ErrorCode.FlowFailed, message="x")
    )
    return Ending(run_id, machine, fence, allowed, status, error, {"ok": True}, {"by": "test"})


def trace_of(value: Any) -> Any:
    """A result or a read as plain data: messages without their outbox ids, bodies parsed."""
    if isinstance(value, BaseModel):  # a Run read back, an AssignedRun
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [trace_of(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {}
        for item in dataclasses.fields(value):
            field_value = getattr(value, item.name)
            if item.name == "messages":
                field_value = [(m.kind, m.routing_key, json.loads(m.body)) for m in field_value]
            data[item.name] = trace_of(field_value)
        return (type(value).__name__, data)
    return value


class Trace:
    """Records what a scenario saw, for the comparison of the two stores."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __call__(self, value: Any) -> Any:
        self.items.append(trace_of(value))
        return value


Scenario = Callable[[Store, Trace], Awaitable[None]]


# ---- scenarios --------------------------------------------------------------------------------
async def admission_scenario(store: Store, seen: Trace) -> None:
    t, reads = store.transitions, store.reads
    assert isinstance(seen(await t.admit(admission("r1"))), Queued)
    again = seen(await t.admit(admission("r1")))
    assert again == Duplicate(status=RunStatus.queued)
    throttled = seen(await t.admit(admission("r2", throttle=1)))
    assert (
        isinstance(throttled, Rejected) and throttled.code is ErrorCode.DesktopFlowsActionThrottled
    )
    full = seen(await t.admit(admission("r3", connection="c2", cap=1)))
    assert isinstance(full, Rejected) and full.code is ErrorCode.QueueFull
    refusal = Refusal(request(run_id="r4"), ErrorCode.ConnectionNotFound, "no such connection", NOW)
    refused = seen(await t.reject(refusal))
    assert isinstance(refused, Rejected) and refused.code is ErrorCode.ConnectionNotFound
    assert [m.routing_key for m in refused.messages] == ["run.rejected.-"]
    known = Refusal(request(run_id="r6"), ErrorCode.GroupIsEmpty, "empty", NOW, "g:bots",
                    ConnectionKind.credentials)  # fmt: skip
    assert isinstance(seen(await t.reject(known)), Rejected)
    seen(await reads.get("r6"))
    duplicate = Refusal(request(run_id="r1"), ErrorCode.ConnectionNotFound, "x", NOW)
    assert seen(await t.reject(duplicate)) == Duplicate(status=RunStatus.queued)
    assert isinstance(seen(await t.admit(admission("r5", at=NOW + 1, priority="high"))), Queued)
    by_submitter = dataclasses.replace(admission("r7", connection="c2"), submitter="env1")
    queued = seen(await t.admit(by_submitter))
    assert isinstance(queued, Queued)
    assert [m.routing_key for m in queued.messages] == ["run.queued.env1"]
    # The throttle counts per connection and per calendar minute (``now // 60``).
    for run_id, connection, at in (("t1", "c7", NOW + 59), ("t2", "c8", NOW + 59),
                                   ("t3", "c7", NOW + 60)):  # fmt: skip
        admitted = await t.admit(admission(run_id, connection=connection, at=at, throttle=1))
        assert isinstance(seen(admitted), Queued), (run_id, admitted)
    late = seen(await t.admit(admission("t4", connection="c7", at=NOW + 61, throttle=1)))
    assert isinstance(late, Rejected) and late.code is ErrorCode.DesktopFlowsActionThrottled
    for read in (
        await reads.get("r1"),
        await reads.get("r3"),
        await reads.get("r4"),
        await reads.get_many(["r1", "nope"]),
        await reads.states(["r1", "nope"]),
        await reads.targets(),
        await reads.lane_names("g:bots"),
        await reads.lane_members("g:bots", await reads.lane_names("g:bots"), 5),
        await reads.queue_page("g:bots", 0, -1),
        await reads.due_deadlines(NOW + 2 * HOUR),
        await reads.finished_since(RunStatus.rejected, NOW - 1, NOW + 1),
        await reads.score_of("r5"),
    ):
        seen(read)
    run = await reads.get("r1")
    assert run is not None and await reads.position(run) == 2  # r5 is high priority
    rejected = await reads.get("r3")
    assert rejected is not None and rejected.error is not None
    assert rejected.error.code is ErrorCode.QueueFull


async def hand_off_scenario(store: Store, seen: Trace) -> None:
    t, reads, machines = store.transitions, store.reads, store.machines
    for run_id, connection in (("r1", "c1"), ("r2", "c2"), ("r5", "c1")):
        await t.admit(admission(run_id, connection=connection))
    reserved = seen(await t.reserve_handoffs(["r1", "nope"]))
    assert reserved == [HandoffFacts(1, "flow-1", {"n": "r1"}), None]
    claimed = seen((await t.claim_many([claim("r1")], NOW + 1))[0])
    assert isinstance(claimed, Claimed) and claimed.fence == 1
    ids = [m.id for m in claimed.messages]
    assert all(ids) and len(set(ids)) == len(ids)  # each outbox entry has its own id
    event, assign = claimed.messages
    assert (event.kind, event.routing_key) == ("event", "run.dispatched.-")
    assignment = Assignment.model_validate_json(assign.body)
    assert (assign.kind, assign.routing_key) == ("assign", "m1")
    assert (assignment.run_id, assignment.fence, assignment.machine_id) == ("r1", 1, "m1")
    assert (assignment.user, assignment.mode, assignment.sealed_secret) == (
        "CONTOSO\\Svc1",
        Mode.unattended,
        "sx1.k.s",
    )
    assert [a.user for a in seen(await machines.assigned("m1"))] == ["contoso\\svc1"]
    seen(await reads.get("r1"))
    seen(await reads.queue_page("g:bots", 0, -1))
    seen(await reads.lane_members("g:bots", await reads.lane_names("g:bots"), 5))
    results = seen(await t.claim_many([
        claim("r1"),
        claim("r2", connection="c2", user="CONTOSO\\Svc2"),
        claim("r5", slots=2),
    ], NOW + 2))  # fmt: skip
    assert [type(r) for r in results] == [NotQueued, NoSlot, UserBusy]
    refused = seen(await t.start_many([start("r1", 2), start("r1", 1, "m2")], NOW + 3))
    assert refused == [Refused(status=RunStatus.dispatched, fence=1)] * 2
    started = seen(await t.start_many([start("r1", 1)], NOW + 3))
    assert isinstance(started[0], Started)
    assert [m.routing_key for m in started[0].messages] == ["run.started.-"]
    # The worker that started it asks again (its answer was lost): Started, nothing recorded.
    assert seen(await t.start_many([start("r1", 1)], NOW + 4)) == [Started()]
    another = dataclasses.replace(start("r1", 1), worker_id="worker-2")
    assert seen(await t.start_many([another], NOW + 4)) == [
        Refused(status=RunStatus.running, fence=1)
    ]
    seen(await reads.states(["r1", "r2"]))
    assert seen(await reads.overdue_running(NOW + 2 * HOUR)) == ["r1"]
    await t.forget_running("r1")
    assert seen(await reads.overdue_running(NOW + 2 * HOUR)) == []
    endings = [
        ending("r1", 7),
        ending("r1", 1, allowed=(RunStatus.dispatched,)),
        ending("nope", None),
        ending("r1", 1, machine="m2"),  # the same fence from another machine: not its run
    ]
    results = seen(await t.finish_many(endings, NOW + 5))
    assert results == [
        Stale(status=RunStatus.running, fence=1),
        Conflict(status=RunStatus.running),
        Missing(),
        Stale(status=RunStatus.running, fence=1),
    ]
    assert [a.run_id for a in await machines.assigned("m1")] == ["r1"]  # m1's slot is kept
    finished = seen((await t.finish_many([ending("r1", 1)], NOW + 6))[0])
    assert isinstance(finished, Finished)
    assert json.loads(finished.messages[0].body)["outputs"] == {"ok": True}
    assert seen(await t.finish_many([ending("r1", 1)], NOW + 7)) == [
        Conflict(status=RunStatus.succeeded)
    ]
    assert seen(await machines.assigned("m1")) == []
    seen(await reads.get("r1"))
    seen(await reads.finished_since(RunStatus.succeeded, NOW, NOW + 10))
    # A failed ending: its error recorded, no outputs; fenced by ``None`` (a dispatched run).
    taken = (await t.claim_many([claim("r2", connection="c2", user="CONTOSO\\Svc2")], NOW + 8))[0]
    assert isinstance(taken, Claimed)
    failed = dataclasses.replace(
        ending("r2", None, RunStatus.failed, allowed=(RunStatus.dispatched, RunStatus.running)),
        outputs=None,
    )
    assert isinstance(seen((await t.finish_many([failed], NOW + 9))[0]), Finished)
    seen(await reads.get("r2"))
    seen(await reads.finished_since(RunStatus.failed, NOW, NOW + 10))


async def adoption_scenario(store: Store, seen: Trace) -> None:
    """Workers report runs whose claim and start the store lost (adopt.lua)."""
    t, reads, machines = store.transitions, store.reads, store.machines
    for run_id, connection in (("r1", "c1"), ("r2", "c2")):
        await t.admit(admission(run_id, connection=connection))
    queued = await reads.get("r1")
    assert queued is not None
    adopt = Adoption(queued, 5, NOW + HOUR, "m1", "worker-1", "CONTOSO\\Svc1")
    [adopted] = seen(await t.adopt_many([adopt], NOW + 1))
    assert isinstance(adopted, Started)
    assert [m.routing_key for m in adopted.messages] == ["run.started.-"]
    seen(await reads.get("r1"))
    seen(await reads.queue_page("g:bots", 0, -1))
    assert [a.run_id for a in seen(await machines.assigned("m1"))] == ["r1"]  # slot taken
    again = seen(await t.adopt_many([adopt], NOW + 2))
    assert again == [Refused(status=RunStatus.running, fence=5)]
    # No later hand-off re-uses the fence the worker reported.
    [facts] = seen(await t.reserve_handoffs(["r2"]))
    assert facts is not None and facts.fence == 6
    taken = (await t.claim_many([claim("r2", connection="c2", user="CONTOSO\\Svc2", slots=2,
                                       fence=6)], NOW + 3))[0]  # fmt: skip
    assert isinstance(taken, Claimed)
    # m2 runs r2 under a fence issued before the loss: its report wins over m1's hand-off.
    handed = await reads.get("r2")
    assert handed is not None
    other = Adoption(handed, 3, NOW + HOUR, "m2", "worker-2", "CONTOSO\\Svc2")
    assert isinstance(seen(await t.adopt_many([other], NOW + 4))[0], Started)
    assert [a.run_id for a in seen(await machines.assigned("m1"))] == ["r1"]
    assert [a.run_id for a in seen(await machines.assigned("m2"))] == ["r2"]
    assert seen(await t.start_many([start("r2", 6)], NOW + 5)) == [
        Refused(status=RunStatus.running, fence=3)
    ]
    seen(await reads.get("r2"))
    seen(sorted(await reads.overdue_running(NOW + 30 * 24 * HOUR)))


async def queue_scenario(store: Store, seen: Trace) -> None:
    t, reads = store.transitions, store.reads
    await t.admit(admission("r1", deadline=NOW + 10))
    await t.admit(admission("r2", at=NOW + 1, connection="c2"))
    r2 = await reads.get("r2")
    assert r2 is not None
    moved = seen(
        await t.reorder(
            r2, score=NOW - 5, priority=Priority.normal, event="moved_to_top", now=NOW + 2
        )
    )
    assert moved == Reordered()
    r2 = await reads.get("r2")
    assert r2 is not None
    seen(
        await t.reorder(
            r2, score=NOW - HOUR, priority=Priority.high, event="priority_changed", now=NOW + 3
        )
    )
    seen(await reads.queue_page("g:bots", 0, -1))
    seen(await reads.lane_names("g:bots"))
    r1 = await reads.get("r1")
    assert r1 is not None
    timeout = QueueEnding(
        RunStatus.timed_out,
        RunError(code=ErrorCode.NoCandidateMachine, message="late"),
        True,
        {"reasons": {}},
    )
    assert seen(await t.unqueue(r1, timeout, NOW + 5)) == NotDue()
    assert isinstance(seen(await t.unqueue(r1, timeout, NOW + 11)), Unqueued)
    seen(await reads.get("r1"))
    seen(await reads.queue_page("g:bots", 0, -1))
    seen(await reads.lane_names("g:bots"))
    seen(await reads.finished_since(RunStatus.timed_out, NOW, NOW + 20))
    cancel = QueueEnding(RunStatus.cancelled, RunError(code=ErrorCode.Cancelled, message="no"))
    assert seen(await t.unqueue(r1, cancel, NOW + 12)) == Conflict(status=RunStatus.timed_out)
    assert seen(await t.reorder(r1, score=1.0, priority=Priority.normal, event="x", now=NOW)) == (
        Conflict(status=RunStatus.timed_out)
    )
    r2 = await reads.get("r2")
    assert r2 is not None
    head = QueuedHead("r2", NOW - HOUR, lane_of("c2", "unattended", "high"))
    kind = ConnectionKind.credentials
    fence = (await t.reserve_handoffs(["r2"]))[0]
    assert fence is not None and fence.fence == 1
    handed = Claim(head, "g:bots", "m1", "CONTOSO\\svc2", kind, 60.0, "", 1, fence.fence)
    claimed = (await t.claim_many([handed], NOW + 13))[0]
    assert isinstance(claimed, Claimed)
    dispatched = await reads.get("r2")
    assert dispatched is not None
    assert isinstance(
        seen(await t.requeue(dispatched, reason="machine offline", now=NOW + 14)), Requeued
    )
    seen(await reads.get("r2"))
    seen(await reads.queue_page("g:bots", 0, -1))
    seen(await reads.lane_members("g:bots", await reads.lane_names("g:bots"), 5))
    seen(await reads.targets())
    assert seen(await t.requeue(dispatched, reason="again", now=NOW + 15)) == Conflict(
        status=RunStatus.queued
    )
    seen(await reads.get("r2"))
    seen(await reads.due_deadlines(NOW + 2 * HOUR))
    queued = await reads.get("r2")
    assert queued is not None
    assert seen(await t.request_cancel(queued, reason="stop", now=NOW + 16)) == Conflict(
        status=RunStatus.queued
    )
    again = (await t.reserve_handoffs(["r2"]))[0]
    assert again is not None and again.fence == 2
    handed = dataclasses.replace(handed, fence=again.fence)
    claimed = (await t.claim_many([handed], NOW + 17))[0]
    assert isinstance(claimed, Claimed) and claimed.fence == 2
    await t.start_many([start("r2", 2)], NOW + 18)
    running = await reads.get("r2")
    assert running is not None
    cancelled = seen(await t.request_cancel(running, reason="stop", now=NOW + 19))
    assert isinstance(cancelled, CancelRequested)
    message = cancelled.messages[0]
    assert (message.kind, message.routing_key) == ("cancel", "m1")
    assert json.loads(message.body) == {"run_id": "r2", "fence": 2, "reason": "stop"}
    record = seen(await reads.get("r2"))
    assert record.cancel_requested and record.timeline[-1].event == "cancel_requested"
    # A queued run cancelled before its deadline leaves its queue at once (not "not due").
    await t.admit(admission("r3", at=NOW + 20, connection="c3"))
    r3 = await reads.get("r3")
    assert r3 is not None
    cancel_now = QueueEnding(
        RunStatus.cancelled, RunError(code=ErrorCode.Cancelled, message="no"), False, {"by": "x"}
    )
    assert isinstance(seen(await t.unqueue(r3, cancel_now, NOW + 21)), Unqueued)
    seen(await reads.get("r3"))
    seen(await reads.queue_page("g:bots", 0, -1))
    seen(await reads.targets())
    seen(await reads.finished_since(RunStatus.cancelled, NOW, NOW + 30))


async def reasons_scenario(store: Store, seen: Trace) -> None:
    t, reads = store.transitions, store.reads
    await t.admit(admission("r1"))
    lane = lane_of("c1", "unattended", "normal")
    waiting = {lane: ("r1", {"m1": "NoFreeSlot"})}
    assert seen(await t.record_reasons("g:bots", waiting, NOW + 1)) == 1
    assert seen(await t.record_reasons("g:bots", waiting, NOW + 2)) == 0
    changed = {lane: ("r1", {"m1": "MachineOffline (never seen)"})}
    assert seen(await t.record_reasons("g:bots", changed, NOW + 3)) == 1
    seen(await reads.lane_reasons("g:bots", lane))
    run = seen(await reads.get("r1"))
    assert [e.event for e in run.timeline] == ["queued", "waiting", "waiting"]
    assert seen(await t.record_reasons("g:bots", {}, NOW + 4)) == 0
    await t.admit(admission("r2", connection="c2"))
    other = lane_of("c2", "unattended", "normal")
    both = {lane: changed[lane], other: ("r2", {"m1": "NoFreeSlot"})}
    assert seen(await t.record_reasons("g:bots", both, NOW + 5)) == 1  # only r2's lane changed
    both[lane] = ("r1", {"m1": "NoFreeSlot"})
    both[other] = ("r2", {"m1": "MachineInMaintenance"})
    assert seen(await t.record_reasons("g:bots", both, NOW + 6)) == 2
    seen(await reads.get("r2"))
    seen(await reads.lane_reasons("g:bots", other))
    # Reasons worked out while r3 was queued, written after it left the queue: the lane's
    # reasons change, its timeline does not (it ends with its ending, not with a "waiting").
    await t.admit(admission("r3", connection="c3"))
    r3 = await reads.get("r3")
    assert r3 is not None
    ending = QueueEnding(
        RunStatus.timed_out, RunError(code=ErrorCode.NoCandidateMachine, message="deadline")
    )
    seen(await t.unqueue(r3, ending, NOW + 7))
    late = {lane_of("c3", "unattended", "normal"): ("r3", {"m1": "NoFreeSlot"})}
    assert seen(await t.record_reasons("g:bots", late, NOW + 8)) == 1
    assert [e.event for e in seen(await reads.get("r3")).timeline] == ["queued", "timed_out"]
    await t.forget_deadline("r1")
    assert seen(await reads.due_deadlines(NOW + 2 * HOUR)) == ["r2"]


async def retention_scenario(store: Store, seen: Trace) -> None:
    """A finished index keeps no entry past the retention (its run has expired)."""
    t, reads = store.transitions, store.reads
    retention = new_settings().retention_s
    cancel = QueueEnding(RunStatus.cancelled, RunError(code=ErrorCode.Cancelled, message="x"))
    for index, run_id in enumerate(("old1", "old2", "new")):
        at = NOW + index + (retention + 10 if run_id == "new" else 0)
        seen(await t.admit(admission(run_id, at=at, connection=f"c{index}")))
        run = seen(await reads.get(run_id))
        assert run is not None
        seen(await t.unqueue(run, cancel, at + 1))
    kept = seen(await reads.finished_since(RunStatus.cancelled, 0, NOW + 2 * retention))
    assert kept == ["new"]


async def timeline_scenario(store: Store, seen: Trace) -> None:
    """A run's timeline is bounded: its first entry stays, the oldest after it go."""
    t, reads = store.transitions, store.reads
    await t.admit(admission("r1"))
    lane = lane_of("c1", "unattended", "normal")
    for index in range(300):
        reasons = {f"m{index % 7}": "NoFreeSlot", "m99": f"MachineOffline ({index})"}
        await t.record_reasons("g:bots", {lane: ("r1", reasons)}, NOW + index)
        if index % 50 == 49:
            seen(await reads.get("r1"))  # the same timeline in Redis and in the fake
    run = seen(await reads.get("r1"))
    assert run.timeline[0].event == "queued"
    assert 100 < len(run.timeline) < 300
    assert run.timeline[-1].detail == {"reasons": reasons}
    raw = await t.redis.hget(t.names.run("r1"), "tl") if hasattr(t, "redis") else None
    assert raw is None or len(raw) <= 16384


async def fences_scenario(store: Store, seen: Trace) -> None:
    """Every reservation gets a fence of its own, in the order reserved: a fence is never
    handed out twice (one reserved for an unknown run is used up all the same)."""
    t = store.transitions
    for run_id in ("r1", "r2", "r3"):
        await t.admit(admission(run_id))
    batches = (["r1"], ["r1", "r2"], ["r3", "r1", "r2"], ["r2"], ["nope", "r3"], ["r1"])
    reserved = [seen(await t.reserve_handoffs(ids)) for ids in batches]
    fences = [[f.fence if f is not None else None for f in batch] for batch in reserved]
    assert fences == [[1], [2, 3], [4, 5, 6], [7], [None, 9], [10]]
    assert [f.flow_id for f in reserved[2] if f is not None] == ["flow-1"] * 3


SCENARIOS: dict[str, Scenario] = {
    "admission": admission_scenario,
    "timeline": timeline_scenario,
    "retention": retention_scenario,
    "hand-off": hand_off_scenario,
    "fences": fences_scenario,
    "adoption": adoption_scenario,
    "queue": queue_scenario,
    "reasons": reasons_scenario,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_the_store_keeps_its_contract(store: Store, name: str) -> None:
    await SCENARIOS[name](store, Trace())


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_the_fake_answers_what_redis_answers(name: str) -> None:
    traces = {}
    for kind in ("redis", "fake"):
        async with open_store(kind) as opened:
            seen = Trace()
            await SCENARIOS[name](opened, seen)
            traces[kind] = seen.items
    assert len(traces["fake"]) > 5
    for step, (real, fake) in enumerate(zip(traces["redis"], traces["fake"], strict=True)):
        assert real == fake, f"step {step} of {name}"
