"""The placement model: lanes in queue order, and passes that may look at freed machines only."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.simulation import Lanes, Waiting, never_eligible, place_pass, release
from dispatcher.models import MachineView, Mode, Priority
from tests.support.builders import ACTIVE, ROBOT, credentials, machine, sign_in, view

from .test_properties import machine_views

pytestmark = pytest.mark.unit

CONNECTIONS = {
    c.connection_id: c
    for c in (
        credentials(connection_id="c1"),
        credentials(connection_id="c2", username="CONTOSO\\x"),
        sign_in(connection_id="s1"),
    )
}
JOBS = [("c1", Mode.attended), ("c1", Mode.unattended), ("c2", Mode.unattended)]
JOBS += [("s1", Mode.attended)]


def waiting(run_id: str, connection: str = "c1", score: float = 0.0, **kw: Any) -> Waiting:
    return Waiting(
        run_id, connection, kw.get("mode", Mode.unattended), kw.get("priority", Priority.normal),
        score,
    )  # fmt: skip


def test_lanes_give_heads_in_queue_order_and_let_runs_leave_from_anywhere() -> None:
    lanes = Lanes()
    for run in (waiting("b", score=2), waiting("a", score=1), waiting("c", score=3)):
        lanes.add(run)
    lanes.add(waiting("x", "c2", score=5))
    assert [run.run_id for run in lanes.heads()] == ["a", "x"]
    assert lanes.remove("a") is not None and lanes.remove("a") is None
    assert "a" not in lanes and "b" in lanes and len(lanes) == 3
    assert lanes.head("c1|unattended|normal") == waiting("b", score=2)
    lanes.remove("x")
    assert lanes.head("c2|unattended|normal") is None
    assert [run.run_id for run in lanes.heads()] == ["b"]


def test_a_pass_places_heads_in_order_and_skips_a_lane_that_cannot_go() -> None:
    views = {"m1": view(machine("m1", slots=2), sessions=((ROBOT, ACTIVE),))}
    lanes = Lanes()
    lanes.add(waiting("u1", score=1))  # c1 unattended: its user has a session there
    lanes.add(waiting("a1", score=2, mode=Mode.attended))
    lanes.add(waiting("a2", score=3, mode=Mode.attended))
    lanes.add(waiting("x1", "c2", score=4))
    placed, blocked = place_pass(lanes, views, CONNECTIONS, random.Random(0))
    assert [(p.run.run_id, p.machine_id) for p in placed] == [("a1", "m1"), ("x1", "m1")]
    assert [(b.run.run_id, dict(b.reasons)) for b in blocked] == [
        ("u1", {"m1": "SessionExistsForTheUserWhenUnattended"}),
        ("a2", {"m1": "UserRunInProgress"}),
    ]
    assert [run.run_id for run in lanes.heads()] == ["u1", "a2"]
    assert views["m1"].load == 2


def test_never_eligible_looks_past_the_dispatchers_runs() -> None:
    busy = view(machine("m1"), assigned=(("CONTOSO\\x", Mode.unattended),))
    assert never_eligible([busy], CONNECTIONS["c1"], Mode.unattended) is None  # a slot frees
    assert never_eligible([busy], CONNECTIONS["c1"], Mode.attended) == {
        "m1": "AttendedUserNotLoggedIn"
    }
    assert never_eligible([busy], None, Mode.attended) == {"m1": "ConnectionNotFound"}


@st.composite
def states(draw: st.DrawFn) -> tuple[dict[str, MachineView], list[Waiting]]:
    ids = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5, unique=True))
    views = {f"m{i}": draw(machine_views(f"m{i}")) for i in ids}
    runs = []
    for index in range(draw(st.integers(1, 30))):
        connection_id, mode = draw(st.sampled_from(JOBS))
        priority = draw(st.sampled_from(list(Priority)))
        runs.append(waiting(f"r{index:02d}", connection_id, index, mode=mode, priority=priority))
    return views, runs


@settings(max_examples=300, deadline=None)
@given(state=states(), freed=st.data(), seed=st.integers(0, 2**32 - 1))
def test_after_a_pass_the_freed_machines_alone_decide_as_all_machines_would(
    state: Any, freed: st.DataObject, seed: int
) -> None:
    views, runs = state
    lanes = Lanes()
    for run in runs:
        lanes.add(run)
    place_pass(lanes, views, CONNECTIONS, random.Random(seed))  # every head left is stuck
    # Runs end on some machines (theirs or the pass's), then the next pass.
    released: set[str] = set()
    for machine_id, current in list(views.items()):
        for run in current.assigned:
            if freed.draw(st.booleans()):
                views[machine_id] = release(views[machine_id], run.run_id)
                released.add(machine_id)
    everywhere, only = Lanes(), Lanes()
    for run in runs:
        if run.run_id in lanes:
            everywhere.add(run)
            only.add(run)
    full = place_pass(everywhere, dict(views), CONNECTIONS, random.Random(seed + 1))
    quick = place_pass(only, dict(views), CONNECTIONS, random.Random(seed + 1), only=released)
    assert [(p.run.run_id, p.machine_id) for p in quick[0]] == [
        (p.run.run_id, p.machine_id) for p in full[0]
    ]
    assert [b.run.run_id for b in quick[1]] == [b.run.run_id for b in full[1]] or not released
