"""Predicted misses and the fail-early rule: certain misses only, never on thin data."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.capacity import replay
from dispatcher.core.forecast import Outlook, QueuedRun, predict_starts
from dispatcher.core.misses import (
    FailEarlyPolicy,
    earliest_dispatch,
    lane_free_at,
    misses_for_sure,
    predicted_misses,
)
from dispatcher.core.service_model import ServiceModel
from dispatcher.core.trace import TraceRecord
from dispatcher.models import AssignedRun, ConnectionKind, MachineView, Mode, Priority, RunStatus
from tests.support.builders import ATTENDED, UNATTENDED, machine, view

from .scenarios import HOUR, users

pytestmark = pytest.mark.unit

NOW = 10_000.0
CREDENTIALS = ConnectionKind.credentials
POLICY = FailEarlyPolicy()


def history(runs: int, seconds: float = 2.0, spread: float = 0.2, seed: int = 0) -> ServiceModel:
    """``runs`` runs completed in the last minutes, slot times ``seconds`` +- ``spread``."""
    rng = random.Random(seed)
    model = ServiceModel()
    for index in range(runs):
        at = NOW - 300 + index
        model.observe(
            CREDENTIALS,
            "f",
            dispatched_at=at - rng.uniform(seconds - spread, seconds + spread),
            finished_at=at,
        )
    return model


def saturated(
    ahead: int,
    deadline_s: float,
    *,
    fail_early: bool = True,
    connections: int = 2,
    now: float = NOW,
) -> list[QueuedRun]:
    """``ahead`` runs with the default deadline, round robin over ``connections`` accounts,
    then the run under test (account c0) with its deadline ``deadline_s`` from ``now``."""
    runs = [
        QueuedRun(f"r{i}", f"c{i % connections}", UNATTENDED, "f", now + HOUR) for i in range(ahead)
    ]
    return [
        *runs,
        QueuedRun("late", "c0", UNATTENDED, "f", now + deadline_s, fail_early=fail_early),
    ]


def one_machine(slots: int = 2) -> list[MachineView]:
    return [view(machine("m1", slots=slots))]


# --- the lane bound ---------------------------------------------------------------------------


def test_the_lane_bound_counts_starts_of_the_lanes_machines() -> None:
    # Two machines free now, runs of 10 s at least, 5 runs ahead that will not time out:
    # starts at 0, 0, 10, 10, 20 go to them; the run is the sixth start, at 20 s.
    assert earliest_dispatch([0.0, 0.0], [math.inf] * 5, 10.0) == 20.0
    # A machine busy for 3 more seconds shifts its starts.
    assert earliest_dispatch([0.0, 3.0], [math.inf] * 3, 10.0) == 13.0
    # Runs ahead that time out before the run could start do not hold it up.
    assert earliest_dispatch([0.0], [5.0, 5.0, math.inf], 10.0) == 10.0
    assert earliest_dispatch([0.0], [], 10.0) == 0.0
    assert earliest_dispatch([], [1.0], 10.0) == math.inf
    assert earliest_dispatch([4.0, 2.0], [math.inf] * 9, 0.0) == 2.0


def test_the_lane_frees_where_its_user_runs_and_where_the_slots_are_full() -> None:
    model = history(40, seconds=10.0, spread=0.0)
    connection = users(2)["c0"]
    own = AssignedRun(run_id="own", mode=Mode.unattended, user="contoso\\bot0", fence=1)
    other = AssignedRun(run_id="other", mode=Mode.unattended, user="contoso\\bot1", fence=1)
    views = [
        view(machine("a", slots=2)),
        view(machine("b", slots=2)).model_copy(update={"assigned": (own,)}),
        view(machine("c", slots=1)).model_copy(update={"assigned": (other,)}),
        view(machine("d"), online=False),
    ]
    free = lane_free_at(views, connection, Mode.unattended, model, NOW, quantile=0.05)
    assert free == [NOW, pytest.approx(NOW + 10), pytest.approx(NOW + 10)]


@st.composite
def lanes_under_test(draw: st.DrawFn) -> tuple[int, list[float], list[float], int, float]:
    machines = draw(st.integers(1, 3))
    shortest = draw(st.floats(0.5, 5))
    ahead = draw(st.integers(0, 12))
    slot_times = [shortest + draw(st.floats(0, 10)) for _ in range(ahead + 1)]
    deadlines = [draw(st.floats(1, 60)) for _ in range(ahead + 1)]
    others = draw(st.integers(0, 6))  # runs of another account on the same machines
    return machines, slot_times, deadlines, others, shortest


@settings(max_examples=300, deadline=None)
@given(case=lanes_under_test(), seed=st.integers(0, 100))
def test_no_placement_dispatches_a_run_before_its_lane_bound(case: Any, seed: int) -> None:
    """Whatever the slot times (all at least ``shortest``), deadlines and the other account's
    runs, the replay (the placer's rules) never hands the last run over before the bound."""
    machines, slot_times, deadlines, others, shortest = case
    views = [view(machine(f"m{i}", slots=2)) for i in range(machines)]
    records = []
    for index, (seconds, deadline) in enumerate(zip(slot_times, deadlines, strict=True)):
        records.append(record(f"r{index:02d}", "c0", index * 1e-3, deadline, seconds))
    for index in range(others):
        records.append(record(f"o{index}", "c1", index * 1e-3 + 5e-4, 60.0, shortest))
    outcome = replay(records, views, users(2), priority_boost_s=HOUR, seed=seed)
    bound = earliest_dispatch([0.0] * machines, deadlines[:-1], shortest)
    last = records[len(slot_times) - 1]
    replayed = outcome[last.run_id]
    if replayed.outcome == "dispatched":
        assert replayed.waited is not None
        assert last.queued_at + replayed.waited >= bound - 1e-9
    else:
        assert replayed.outcome == "timed_out"


def record(run_id: str, connection: str, at: float, deadline: float, seconds: float) -> TraceRecord:
    return TraceRecord(
        run_id=run_id, target="m:m0", connection_id=connection, kind=CREDENTIALS,
        mode=Mode.unattended, priority=Priority.normal, flow_id="f", queued_at=at,
        queue_deadline=deadline, status=RunStatus.succeeded, dispatched_at=0.0,
        finished_at=seconds,
    )  # fmt: skip


# --- the rule ---------------------------------------------------------------------------------


def test_a_hopeless_run_with_history_is_certain_to_miss_and_fails_early_when_asked() -> None:
    # 30 runs of ~2 s ahead on one machine with 2 slots (one per account): ~30 s of queue.
    queue = saturated(30, deadline_s=5.0)
    misses = predicted_misses(queue, one_machine(), users(2), history(40), NOW)
    assert [m.run_id for m in misses] == ["late"]
    [miss] = misses
    assert (miss.cause, miss.certain, miss.fail_early) == (Outlook.times_out, True, True)
    assert miss.bound_at is not None and miss.bound_at > NOW + 5.0
    # Without the field it is still predicted to miss, but it waits.
    [waits] = predicted_misses(
        saturated(30, 5.0, fail_early=False), one_machine(), users(2), history(40), NOW
    )
    assert (waits.certain, waits.fail_early) == (True, False)


def test_a_run_that_makes_its_deadline_is_no_miss() -> None:
    queue = saturated(4, deadline_s=60.0)
    assert predicted_misses(queue, one_machine(), users(2), history(40), NOW) == []


def test_fail_early_needs_the_minimum_of_recent_samples() -> None:
    queue = saturated(30, deadline_s=5.0)
    [thin] = predicted_misses(queue, one_machine(), users(2), history(15), NOW)
    assert (thin.cause, thin.certain, thin.fail_early) == (Outlook.times_out, False, False)
    # Enough runs, but a day ago: decayed, they are thin data again.
    later = NOW + 24 * HOUR
    queue = saturated(30, deadline_s=5.0, now=later)
    [old] = predicted_misses(queue, one_machine(), users(2), history(40), later)
    assert (old.cause, old.fail_early) == (Outlook.times_out, False)


def test_a_miss_that_the_optimistic_case_would_make_is_not_certain() -> None:
    # Flows of 1 s or 19 s: expected 10 s each, optimistically 1 s. Three runs ahead on one
    # lane: expected start ~30 s, optimistic ~3 s; a 12 s deadline is a likely miss, not a sure one.
    rng = random.Random(1)
    model = ServiceModel()
    for index in range(60):
        at = NOW - 300 + index
        model.observe(CREDENTIALS, "f", dispatched_at=at - rng.choice([1, 19]), finished_at=at)
    queue = saturated(3, deadline_s=12.0, connections=1)
    [miss] = predicted_misses(queue, one_machine(), users(1), model, NOW)
    assert (miss.cause, miss.certain, miss.fail_early) == (Outlook.times_out, False, False)


def test_a_run_no_machine_can_take_is_a_miss_but_never_certain() -> None:
    queue = [QueuedRun("att", "c0", ATTENDED, "f", NOW + 5.0, fail_early=True)]
    [miss] = predicted_misses(queue, one_machine(), users(1), history(40), NOW)
    assert (miss.cause, miss.certain, miss.fail_early) == (Outlook.no_machine, False, False)


def test_predictions_given_are_used_as_they_are() -> None:
    queue = saturated(30, deadline_s=5.0)
    model = history(40)
    predictions = predict_starts(queue, one_machine(), users(2), model, NOW)
    given_ = predicted_misses(queue, one_machine(), users(2), model, NOW, predictions=predictions)
    assert given_ == predicted_misses(queue, one_machine(), users(2), model, NOW)


def test_the_bound_alone_decides_for_a_run_deep_in_its_queue() -> None:
    connection = users(1)["c0"]
    late = QueuedRun("late", "c0", UNATTENDED, "f", NOW + 100.0, fail_early=True)
    model = history(40)  # ~1.8 s at the 5 % quantile
    views = one_machine()
    deep = [NOW + HOUR] * 500  # 500 runs ahead on one lane: one at a time on the one machine
    assert misses_for_sure(
        late, connection, ahead_deadlines=deep, views=views, model=model, now=NOW
    )
    assert not misses_for_sure(
        late, connection, ahead_deadlines=deep[:10], views=views, model=model, now=NOW
    )
    assert not misses_for_sure(
        late, connection, ahead_deadlines=deep, views=views, model=history(10), now=NOW
    )
    # Nobody is logged in for an attended run: no machine can take it, which is not a sure miss.
    attended = QueuedRun("att", "c0", ATTENDED, "f", NOW + 100.0, fail_early=True)
    assert not misses_for_sure(
        attended, connection, ahead_deadlines=deep, views=views, model=model, now=NOW
    )


@st.composite
def thin_histories(draw: st.DrawFn) -> ServiceModel:
    model = ServiceModel()
    count = draw(st.integers(0, int(POLICY.min_samples)))
    for index in range(count):
        seconds = draw(st.floats(0.01, 100))
        model.observe(
            CREDENTIALS, draw(st.sampled_from(["f", "g"])),
            dispatched_at=NOW - 10 - index - seconds, finished_at=NOW - 10 - index,
        )  # fmt: skip
    return model


@settings(max_examples=200, deadline=None)
@given(
    model=thin_histories(),
    ahead=st.integers(0, 40),
    deadline_s=st.floats(0.1, 100),
    slots=st.integers(1, 3),
)
def test_fail_early_never_fires_with_fewer_samples_than_its_minimum(
    model: ServiceModel, ahead: int, deadline_s: float, slots: int
) -> None:
    assert model.samples(CREDENTIALS, NOW) < POLICY.min_samples
    queue = saturated(ahead, deadline_s)
    views = one_machine(slots)
    for miss in predicted_misses(queue, views, users(2), model, NOW, policy=POLICY):
        assert not miss.certain and not miss.fail_early
    deadlines = [run.queue_deadline or math.inf for run in queue[:-1] if run.connection_id == "c0"]
    assert not misses_for_sure(
        queue[-1], users(2)["c0"], ahead_deadlines=deadlines, views=views, model=model, now=NOW
    )
