"""Capacity replay: recorded runs through the placement rules, on today's fleet and another."""

from __future__ import annotations

import heapq
import json
import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.capacity import (
    came_online,
    estimate_handover,
    percentile,
    replay,
    resize_fleet,
    summarize,
    what_if,
)
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.models import (
    ConnectionKind,
    MachineView,
    Mode,
    Priority,
    RunStatus,
    SessionState,
)
from tests.support.builders import ACTIVE, ROBOT, credentials, machine, view

pytestmark = pytest.mark.unit

HOUR = 3600.0
BOOST = HOUR


def accounts(count: int, group: str | None = "g") -> dict[str, Any]:
    """Credentials connections to group ``group`` (or machine m1), one Windows account each."""
    target = {"group_id": group, "machine_id": None} if group else {"machine_id": "m1"}
    return {
        f"c{i}": credentials(connection_id=f"c{i}", username=f"CONTOSO\\bot{i}", **target)
        for i in range(count)
    }


def group(count: int, slots: int = 2) -> list[MachineView]:
    return [view(machine(f"m{i}", group_id="g", slots=slots)) for i in range(count)]


def arrival(
    run_id: str,
    connection: str,
    at: float,
    seconds: float,
    *,
    deadline_s: float = HOUR,
    priority: Priority = Priority.normal,
    target: str = "g:g",
) -> TraceRecord:
    """A run as recorded before its outcome is known (the replay only reads its slot time)."""
    return TraceRecord(
        run_id=run_id, target=target, connection_id=connection, kind=ConnectionKind.credentials,
        mode=Mode.unattended, priority=priority, flow_id="f", queued_at=at,
        queue_deadline=at + deadline_s, status=RunStatus.succeeded, dispatched_at=0.0,
        finished_at=seconds,
    )  # fmt: skip


def reference_history(
    arrivals: list[TraceRecord], slots: int, machine_id: str = "m0", handover: float = 0.0
) -> list[TraceRecord]:
    """What really happens to ``arrivals`` on ONE machine with ``slots`` slots, written without
    the placement code: at every moment, walk the whole queue in order and hand over every run
    whose account has no run on the machine while a slot is free. Returns the records with
    their outcome, as the store would write them."""
    seconds = {r.run_id: r.slot_time or 0.0 for r in arrivals}
    user = {r.run_id: r.connection_id for r in arrivals}  # one account per connection here
    order = {
        r.run_id: (r.queued_at - (BOOST if r.priority is Priority.high else 0.0), r.run_id)
        for r in arrivals
    }
    moments = sorted({r.queued_at for r in arrivals} | {r.queue_deadline for r in arrivals})
    heapq.heapify(moments)
    queue: list[str] = []
    running: dict[str, float] = {}  # run -> when its slot is free again
    result: dict[str, TraceRecord] = {}
    by_id = {r.run_id: r for r in arrivals}
    while moments:
        now = heapq.heappop(moments)
        while moments and moments[0] == now:
            heapq.heappop(moments)
        running = {run: free for run, free in running.items() if free > now}
        for run_id in list(queue):
            if by_id[run_id].queue_deadline <= now:
                queue.remove(run_id)
                result[run_id] = replace(
                    by_id[run_id], status=RunStatus.timed_out, dispatched_at=None,
                    finished_at=by_id[run_id].queue_deadline,
                )  # fmt: skip
        queue.extend(r.run_id for r in arrivals if r.queued_at == now)
        queue.sort(key=order.__getitem__)
        for run_id in list(queue):
            busy = {user[r] for r in running}
            if len(running) < slots and user[run_id] not in busy:
                queue.remove(run_id)
                free = now + seconds[run_id] + handover
                running[run_id] = free
                heapq.heappush(moments, free)
                result[run_id] = replace(
                    by_id[run_id], dispatched_at=now, finished_at=now + seconds[run_id],
                    machine_id=machine_id,
                )  # fmt: skip
    return [result[r.run_id] for r in arrivals]


@st.composite
def traces(draw: st.DrawFn, priorities: bool = True) -> list[TraceRecord]:
    count = draw(st.integers(1, 30))
    connections = draw(st.integers(1, 4))
    return [
        arrival(
            f"r{index:02d}",
            f"c{draw(st.integers(0, connections - 1))}",
            draw(st.floats(0, 30)),
            draw(st.floats(0.1, 10)),
            deadline_s=draw(st.floats(0.5, 20)),
            priority=draw(st.sampled_from(list(Priority))) if priorities else Priority.normal,
        )
        for index in range(count)
    ]


# --- the record ---------------------------------------------------------------------------------


def test_a_record_is_small_json_and_reads_back_the_same() -> None:
    record = TraceRecord(
        run_id="7f1d3c9e-2b4a-4c1e-9d3f-0a1b2c3d4e5f", target="g:finance", connection_id="c1",
        kind=ConnectionKind.sign_in, mode=Mode.attended, priority=Priority.high,
        flow_id="invoice-approval", queued_at=1_700_000_000.123, queue_deadline=1_700_003_600.123,
        status=RunStatus.succeeded, score=1_699_996_400.123, dispatched_at=1_700_000_012.5,
        finished_at=1_700_000_070.25, machine_id="FIN-01",
    )  # fmt: skip
    stored = json.dumps(record.to_dict(), separators=(",", ":"))
    assert len(stored) < 300
    assert TraceRecord.from_dict(json.loads(stored)) == record
    assert (record.slot_time, record.waited) == (pytest.approx(57.75), pytest.approx(12.377))
    queued_only = replace(record, status=RunStatus.timed_out, dispatched_at=None, machine_id=None)
    assert TraceRecord.from_dict(queued_only.to_dict()) == queued_only
    assert (queued_only.slot_time, queued_only.waited) == (None, None)


def test_a_machine_change_reads_back_the_same() -> None:
    change = MachineChange(12.5, "m1", online=True, sessions=(("bob", SessionState.locked),))
    assert MachineChange.from_dict(json.loads(json.dumps(change.to_dict()))) == change


@pytest.mark.parametrize(
    "raw", [{}, {"r": "x"}, {**arrival("r", "c0", 0, 1).to_dict(), "m": "sometimes"}]
)
def test_a_broken_record_is_refused_with_a_reason(raw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        TraceRecord.from_dict(raw)
    with pytest.raises(ValueError, match=r"\w"):
        MachineChange.from_dict(raw)


# --- the fleet ----------------------------------------------------------------------------------


def test_machines_are_added_as_clones_of_the_groups_machines_round_robin() -> None:
    views = [
        *group(2),
        view(machine("lonely")),
        view(machine("m0-clone1", group_id="h")),  # a name a clone would take
    ]
    views[0] = views[0].model_copy(update={"sessions": views[3].sessions})
    bigger, clones = resize_fleet(views, "g:g", 3)
    added = bigger[len(views) :]
    assert [v.machine_id for v in added] == ["m0-clone1x", "m1-clone2", "m0-clone3"]
    assert clones == {"m0-clone1x": "m0", "m1-clone2": "m1", "m0-clone3": "m0"}
    assert all(v.machine.group_id == "g" and v.assigned == () for v in added)
    assert added[0].machine.max_unattended_runs == views[0].machine.max_unattended_runs
    smaller, none = resize_fleet(views, "g:g", -1)
    assert [v.machine_id for v in smaller] == ["m0", "lonely", "m0-clone1"]
    assert none == {}
    assert resize_fleet(views, "g:g", 0) == (views, {})
    with pytest.raises(ValueError, match="group"):
        resize_fleet(views, "m:lonely", 1)
    with pytest.raises(ValueError, match="no machines"):
        resize_fleet(views, "g:empty", 1)


# --- the replay ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(trace=traces(), slots=st.integers(1, 3))
def test_the_replay_places_as_the_rules_spelled_out_without_the_placement_code(
    trace: list[TraceRecord], slots: int
) -> None:
    history = reference_history(trace, slots)
    replayed = replay(trace, group(1, slots), accounts(4), priority_boost_s=BOOST)
    for record in history:
        outcome = replayed[record.run_id]
        assert outcome.outcome == ("timed_out" if record.waited is None else "dispatched")
        assert outcome.waited == (None if record.waited is None else pytest.approx(record.waited))


@settings(max_examples=100, deadline=None)
@given(trace=traces(), slots=st.integers(1, 3))
def test_replaying_the_recorded_fleet_reproduces_the_recorded_waits(
    trace: list[TraceRecord], slots: int
) -> None:
    history = reference_history(trace, slots)
    report = what_if(
        history, group(1, slots), accounts(4), target="g:g", add_machines=0, since=0.0,
        priority_boost_s=BOOST, handover_s=0.0,
    )  # fmt: skip
    assert report.today == report.recorded == report.changed


def test_a_saturated_window_times_out_less_with_machines_added() -> None:
    rng = random.Random(4)
    # Three accounts, one machine with 2 slots: ~1.6 runs/s of 2-4 s each cannot be served.
    trace = [
        arrival(f"r{i:03d}", f"c{i % 3}", i * 0.6, rng.uniform(2, 4), deadline_s=10.0)
        for i in range(200)
    ]
    history = reference_history(trace, slots=2)
    assert summarize(history, None, 1).timed_out > 50

    def report(add: int) -> Any:
        return what_if(
            history, group(1), accounts(3), target="g:g", add_machines=add, since=0.0,
            priority_boost_s=BOOST,
        )  # fmt: skip

    one, two, four = report(1), report(2), report(4)
    assert one.today == one.recorded  # today's fleet reproduces the recording
    assert one.recorded.timed_out > one.changed.timed_out > two.changed.timed_out
    assert four.changed.timed_out == 0
    assert (four.changed.machines, four.today.machines) == (5, 1)
    assert four.changed.p95_wait_s is not None and four.changed.p95_wait_s < 1.0


@settings(max_examples=150, deadline=None)
@given(
    trace=traces(priorities=False),
    machines=st.integers(1, 3),
    slots=st.integers(1, 3),
    add=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_for_one_account_adding_machines_never_adds_time_outs(
    trace: list[TraceRecord], machines: int, slots: int, add: int, seed: int
) -> None:
    """Runs of one account go one per machine at a time, first come first served: more
    machines never time out more of them (bench/replay_monotonicity: 30,000 traces too)."""
    one = [replace(r, connection_id="c0") for r in trace]
    views = group(machines, slots)
    bigger, clones = resize_fleet(views, "g:g", add)
    today = replay(one, views, accounts(1), priority_boost_s=BOOST, seed=seed)
    more = replay(one, bigger, accounts(1), priority_boost_s=BOOST, clones=clones, seed=seed)
    assert summarize(one, more, 0).timed_out <= summarize(one, today, 0).timed_out


def test_with_several_accounts_one_replay_can_be_unlucky_so_the_median_of_several_is_shown() -> (
    None
):
    """The placer breaks ties between equally loaded machines at random. Here r4 (account c1)
    finds a machine only if r1 (also c1) did not land on the one with a free slot at 10 s: in
    one replay a machine more costs a time-out, in another it saves one (bench/replay_monotonicity
    finds none that costs one for every seed); ``what_if`` reports the median replay."""
    views = [
        view(machine("m0", group_id="g", slots=1)),
        view(machine("m1", group_id="g", slots=3)),
    ]
    trace = [
        arrival("r1", "c1", 6.85, 9.45, deadline_s=7.66),
        arrival("r2", "c2", 7.39, 4.97, deadline_s=3.74),
        arrival("r3", "c0", 8.79, 8.79, deadline_s=14.32),
        arrival("r4", "c1", 10.04, 1.74, deadline_s=1.85),
    ]
    bigger, clones = resize_fleet(views, "g:g", 1)

    def time_outs(seed: int) -> tuple[int, int]:
        today = replay(trace, views, accounts(3), priority_boost_s=BOOST, seed=seed)
        more = replay(trace, bigger, accounts(3), priority_boost_s=BOOST, clones=clones, seed=seed)
        return summarize(trace, today, 2).timed_out, summarize(trace, more, 3).timed_out

    assert time_outs(6) == (0, 1)  # unlucky with three machines
    assert time_outs(0) == (1, 0)  # unlucky with two
    report = what_if(
        trace, views, accounts(3), target="g:g", add_machines=1, since=0.0,
        priority_boost_s=BOOST,
    )  # fmt: skip
    assert (report.today.timed_out, report.changed.timed_out) == (0, 0)


def test_the_hand_over_is_measured_and_replayed() -> None:
    rng = random.Random(2)
    trace = [arrival(f"r{i:02d}", "c0", 0.01 * i, rng.uniform(1, 2)) for i in range(20)]
    history = reference_history(trace, slots=1, handover=0.25)
    assert estimate_handover(history) == pytest.approx(0.25)
    report = what_if(
        history, group(1, slots=1), accounts(1), target="g:g", add_machines=0, since=0.0,
        priority_boost_s=BOOST,
    )  # fmt: skip
    assert report.handover_s == pytest.approx(0.25)
    assert report.today == report.recorded
    assert estimate_handover(trace[:1]) == 0.0


def test_a_machine_offline_for_a_while_is_replayed_offline() -> None:
    trace = [arrival("r1", "c0", 1.0, 5.0), arrival("r2", "c0", 2.0, 5.0, deadline_s=3.0)]
    changes = [MachineChange(0.0, "m0", online=False), MachineChange(10.0, "m0", online=True)]
    bigger, clones = resize_fleet(group(1), "g:g", 1)
    for fleet, copies in ((group(1), None), (bigger, clones)):
        outcome = replay(
            trace, fleet, accounts(1), priority_boost_s=BOOST, changes=changes, clones=copies
        )
        # The clone follows its original: offline too.
        assert outcome["r1"].waited == pytest.approx(9.0)
        assert outcome["r2"].outcome == "timed_out"


def test_a_machine_whose_worker_starts_in_the_window_is_replayed_offline_until_then() -> None:
    # Runs queued at 1 s; the worker's first heartbeat (its first change) comes at 5 s.
    trace = [arrival("r1", "c0", 1.0, 2.0), arrival("r2", "c0", 1.0, 2.0, deadline_s=3.0)]
    changes = [MachineChange(5.0, "m0", online=True)]
    assert came_online(trace, changes) == {"m0"}
    bigger, clones = resize_fleet(group(1, slots=1), "g:g", 1)
    for fleet, copies in ((group(1, slots=1), None), (bigger, clones)):
        outcome = replay(
            trace, fleet, accounts(1), priority_boost_s=BOOST, changes=changes, clones=copies
        )
        assert outcome["r1"].waited == pytest.approx(4.0)  # the clone waits for it too
        assert outcome["r2"].outcome == "timed_out"
    # A run handed to the machine before that change shows it was online already (the change
    # was a session or maintenance one): the replay starts it online.
    served = replace(arrival("r0", "c0", 0.0, 0.5), machine_id="m0", dispatched_at=0.5)
    assert came_online([served, *trace], changes) == set()
    outcome = replay([served, *trace], group(1), accounts(1), priority_boost_s=BOOST,
                     changes=changes)  # fmt: skip
    assert outcome["r1"].waited == pytest.approx(0.0)
    # A first change that takes the machine offline says nothing of before.
    assert came_online(trace, [MachineChange(5.0, "m0", online=False)]) == set()


def test_a_session_that_opens_lets_attended_runs_go() -> None:
    connections = {"c": credentials(connection_id="c", group_id="g", machine_id=None)}
    record = replace(arrival("att", "c", 1.0, 5.0), mode=Mode.attended)
    changes = [MachineChange(4.0, "m0", online=True, sessions=((ROBOT, ACTIVE),))]
    outcome = replay([record], group(1), connections, priority_boost_s=BOOST, changes=changes)
    assert outcome["att"].waited == pytest.approx(3.0)


def test_cancelled_and_unknown_runs_leave_and_other_queues_of_the_machines_compete() -> None:
    machine_queue = replace(arrival("own", "own", 0.0, 10.0), target="m:m0")
    cancelled = replace(
        arrival("cancelled", "c1", 0.5, 3.0), status=RunStatus.cancelled, dispatched_at=None,
        finished_at=1.0,
    )  # fmt: skip
    trace = [
        machine_queue,
        arrival("r1", "c0", 0.1, 4.0),  # the group's run goes to the other slot
        cancelled,  # waits for a slot, then its cloud flow gives up
        arrival("r2", "c1", 2.0, 1.0),  # waits for the machine's own run or r1
        arrival("ghost", "deleted", 0.0, 1.0),
    ]
    connections = {**accounts(2), "own": credentials(connection_id="own", username="own")}
    outcome = replay(trace, group(1), connections, priority_boost_s=BOOST)
    assert outcome["own"].waited == 0.0
    assert outcome["r1"].waited == 0.0
    assert outcome["cancelled"].outcome == "left"
    assert outcome["r2"].waited == pytest.approx(2.1)
    assert outcome["ghost"].outcome == "skipped"
    report = what_if(
        trace, group(1), connections, target="g:g", add_machines=1, since=0.05,
        priority_boost_s=BOOST,
    )  # fmt: skip
    assert report.changed.runs == 3  # r1, cancelled and r2: queued in the window for g:g
    assert report.changed.p50_wait_s == 0.0


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
