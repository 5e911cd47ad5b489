"""The forecast and the capacity replay place runs as the placer does: one pass of
``core.simulation.place_pass`` decides exactly what the placer's ``core.placement.plan_pass``
decides."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.placement import plan_pass
from dispatcher.core.simulation import Lanes, Waiting, place_pass
from dispatcher.models import MachineView, Mode, Priority, QueuedHead
from tests.core.test_properties import machine_views
from tests.support.builders import credentials, fleet, sign_in

pytestmark = pytest.mark.unit

CONNECTIONS = (
    credentials(connection_id="c1"),
    credentials(connection_id="c2", username="CONTOSO\\x"),
    sign_in(connection_id="s1"),
)
JOBS = [("c1", Mode.attended), ("c1", Mode.unattended), ("c2", Mode.unattended)]
JOBS += [("s1", Mode.attended), ("gone", Mode.unattended)]  # "gone": a deleted connection


@st.composite
def queues(draw: st.DrawFn) -> list[Waiting]:
    count = draw(st.integers(1, 40))
    runs = []
    for index in range(count):
        connection_id, mode = draw(st.sampled_from(JOBS))
        runs.append(
            Waiting(
                f"run-{index:02d}",
                connection_id,
                mode,
                draw(st.sampled_from(list(Priority))),
                float(draw(st.integers(0, 20))),  # equal scores: the run id breaks the tie
            )
        )
    return runs


@settings(max_examples=300, deadline=None)
@given(
    views=st.lists(st.integers(0, 5), min_size=1, max_size=5, unique=True).flatmap(
        lambda ids: st.tuples(*(machine_views(f"m{i}") for i in ids))
    ),
    runs=queues(),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_pass_of_the_model_decides_what_the_placer_decides(
    views: tuple[MachineView, ...], runs: list[Waiting], seed: int
) -> None:
    snapshot = fleet(connections=CONNECTIONS)
    lanes: dict[str, list[QueuedHead]] = {}
    for run in sorted(runs, key=lambda r: r.order):
        lanes.setdefault(run.lane, []).append(QueuedHead(run.run_id, run.score, run.lane))

    plan = plan_pass(
        snapshot.connections,
        lanes,
        {v.machine_id: v for v in views},
        per_lane=1000,
        max_placements=10_000,
        rng=random.Random(seed),
    )
    plans, waiting = plan.placements, plan.waiting

    model_lanes = Lanes()
    for run in runs:
        model_lanes.add(run)
    placed, blocked = place_pass(
        model_lanes, {v.machine_id: v for v in views}, snapshot.connections, random.Random(seed)
    )

    assert [(p.run.run_id, p.machine_id) for p in placed] == [
        (plan.head.run_id, plan.view.machine_id) for plan in plans
    ]
    # The placer does not record reasons for a deleted connection's run (it waits for its
    # deadline); every other head left waiting is the same, with the same code per machine.
    assert {
        b.run.lane: (b.run.run_id, {m: code.value for m, code in b.reasons.items()})
        for b in blocked
        if b.run.connection_id != "gone"
    } == {
        lane: (run_id, {m: reason.split(" ")[0] for m, reason in reasons.items()})
        for lane, (run_id, reasons) in waiting.items()
    }
