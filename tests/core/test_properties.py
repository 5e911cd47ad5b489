"""Properties of the pure core, checked on generated fleets, queues and limits (hypothesis)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import same_user, tenant_blocked
from dispatcher.core.deadlines import queue_deadline
from dispatcher.core.ordering import order_score, rescore, top_score
from dispatcher.core.selection import (
    machine_verdict,
    placement_room,
    select_machine,
    slots_of,
)
from dispatcher.models import (
    AssignedRun,
    ConnectionKind,
    JoinType,
    Machine,
    MachineView,
    Mode,
    OsKind,
    Priority,
    Session,
    SessionState,
)
from tests.support.builders import (
    credentials,
    effective_sessions,
    sign_in,
)
from tests.support.constants import OTHER_TENANT, ROBOT, SIGN_IN_USER, TENANT

pytestmark = pytest.mark.unit

# The profile's number of examples (tests/conftest.py); selection, where the rules interact,
# gets three times as many.
FAST = settings(deadline=None)
MORE = settings(deadline=None, max_examples=3 * settings.default.max_examples)

# --- (a) selection --------------------------------------------------------------------------

# A few users, in mixed case, so that sessions and runs of the connection's user show up often,
# and a few others, so that other users' sessions and runs do too.
USERS = st.sampled_from(
    [
        ROBOT,
        ROBOT.lower(),
        SIGN_IN_USER,
        SIGN_IN_USER.upper(),
        "CONTOSO\\x",
        "CONTOSO\\y",
        "z@contoso.com",
    ]
)
# True seven times in eight, shrinking to True: most generated machines pass the cheap checks
# (online, not in maintenance, key registered) and reach the session and slot rules.
MOSTLY = st.integers(0, 7).map(lambda n: n != 7)


@st.composite
def machine_views(draw: st.DrawFn, machine_id: str) -> MachineView:
    machine = Machine(
        machine_id=machine_id,
        name=machine_id,
        os=draw(st.sampled_from(OsKind)),
        join_type=draw(st.sampled_from(JoinType)),
        allowed_registration_tenants=draw(
            st.lists(st.sampled_from([TENANT, OTHER_TENANT]), max_size=2).map(tuple)
        ),
        max_unattended_runs=draw(st.integers(1, 4)),
        maintenance=not draw(MOSTLY),
    )
    sessions = draw(
        st.lists(st.builds(Session, user=USERS, state=st.sampled_from(SessionState)), max_size=3)
    )
    modes = draw(st.lists(st.tuples(USERS, st.sampled_from(Mode)), max_size=4))
    assigned = [
        AssignedRun(run_id=f"{machine_id}-run{index}", mode=mode, user=user, fence=index)
        for index, (user, mode) in enumerate(modes)
    ]
    return MachineView(
        machine=machine,
        online=draw(MOSTLY),
        sessions=tuple(sessions),
        assigned=tuple(assigned),
        has_public_key=draw(MOSTLY),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[MachineView]:
    count = draw(st.integers(0, 8))
    return [draw(machine_views(f"m{index}")) for index in range(count)]


# Sign-in connections only run attended (admission refuses the rest).
JOBS = st.sampled_from(
    [
        (credentials(), Mode.attended),
        (credentials(), Mode.unattended),
        (sign_in(), Mode.attended),
    ]
)


@MORE
@given(views=fleets(), job=JOBS, seed=st.integers(0, 2**32 - 1))
def test_selection_picks_only_eligible_machines_and_the_least_loaded(
    views: list[MachineView], job: Any, seed: int
) -> None:
    connection, mode = job
    verdicts = {view.machine_id: machine_verdict(view, connection, mode) for view in views}
    eligible = {view.machine_id: view.load for view in views if verdicts[view.machine_id] is None}

    selection = select_machine(views, connection, mode, random.Random(seed))

    if not eligible:
        assert selection.machine_id is None
    else:
        assert selection.machine_id in eligible
        assert eligible[selection.machine_id] == min(eligible.values())
    # Every ineligible machine is explained with its own verdict; eligible ones are not.
    assert selection.reasons == {
        machine_id: verdict for machine_id, verdict in verdicts.items() if verdict is not None
    }


@MORE
@given(views=fleets(), job=JOBS, seed=st.integers(0, 2**32 - 1))
def test_selection_does_not_depend_on_the_order_machines_are_listed(
    views: list[MachineView], job: Any, seed: int
) -> None:
    connection, mode = job
    forward = select_machine(views, connection, mode, random.Random(seed))
    backward = select_machine(views[::-1], connection, mode, random.Random(seed))
    assert forward == backward


def reference_verdict(view: MachineView, connection: Any, mode: Mode) -> ErrorCode | None:
    """The verdict spelled out over the effective sessions, without the view's indexes."""
    if view.key_mismatch:
        return ErrorCode.KeyMismatch
    if not view.online:
        return ErrorCode.MachineOffline
    if view.machine.maintenance:
        return ErrorCode.MachineInMaintenance
    if tenant_blocked(view.machine, connection):
        return ErrorCode.UnallowedTenantForConnectWithSignIn
    if not view.has_public_key:
        return ErrorCode.NoWorkerKey
    user = connection.session_user
    occupied = any(same_user(run.user, user) for run in view.assigned)
    if mode is Mode.attended:
        own = [s for s in view.sessions if same_user(s.user, user)]
        if not own:
            if connection.kind is ConnectionKind.sign_in:
                return ErrorCode.NoSessionFoundForPasswordless
            return ErrorCode.AttendedUserNotLoggedIn
        if not any(s.state is SessionState.active for s in own):
            return ErrorCode.AttendedUserSessionNotActive
        return ErrorCode.UserRunInProgress if occupied else None
    sessions = effective_sessions(view)
    own = [s for s in sessions if same_user(s.user, user)]
    if own:
        return {
            SessionState.active: ErrorCode.SessionExistsForTheUserWhenUnattended,
            SessionState.locked: ErrorCode.UnattendedUserSessionLocked,
            SessionState.disconnected: ErrorCode.UnattendedUserSessionDisconnected,
        }[own[0].state]
    in_use = sum(1 for run in view.assigned if run.mode is Mode.unattended)
    if in_use >= slots_of(view):
        return ErrorCode.NoFreeSlot
    if view.machine.os is OsKind.windows_client and any(
        s.state is SessionState.active for s in sessions
    ):
        return ErrorCode.Win10AlreadyHasActiveSession
    return None


@MORE
@given(view=machine_views("m"), other=machine_views("m"), job=JOBS)
def test_verdict_from_the_view_indexes_equals_its_definition(
    view: MachineView, other: MachineView, job: Any
) -> None:
    connection, mode = job
    assert machine_verdict(view, connection, mode) == reference_verdict(view, connection, mode)
    # A copy with other runs and sessions (as a placement pass makes) does not keep the
    # indexes of the view it was copied from.
    copied = view.model_copy(update={"assigned": other.assigned, "sessions": other.sessions})
    assert machine_verdict(copied, connection, mode) == reference_verdict(copied, connection, mode)


@MORE
@given(
    views=fleets(),
    jobs=st.lists(JOBS, min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_pass_never_places_more_runs_than_the_room_it_reads_heads_for(
    views: list[MachineView], jobs: list[Any], seed: int
) -> None:
    """A placement pass reads ``placement_room`` runs per lane: no sequence of placements,
    each applied to the machine as the pass applies it, can take more."""
    room = placement_room(views)
    current = {view.machine_id: view for view in views}
    rng = random.Random(seed)
    placed = 0
    for index, (connection, mode) in enumerate(jobs):
        chosen = select_machine(current.values(), connection, mode, rng).machine_id
        if chosen is None:
            continue
        placed += 1
        view = current[chosen]
        run = AssignedRun(run_id=f"p{index}", mode=mode, user=connection.session_user, fence=0)
        current[chosen] = view.model_copy(update={"assigned": (*view.assigned, run)})
    assert placed <= room


# --- (b) queue order ------------------------------------------------------------------------

# Times on a 1/1024 s grid, around today's epoch: the float arithmetic below is then exact, so
# the properties test the ordering rule, not rounding.
TICK = 1 / 1024
TIMES = st.integers(1_700_000_000 * 1024, 1_700_100_000 * 1024).map(lambda ticks: ticks * TICK)
BOOSTS = st.integers(1, 86_400 * 1024).map(lambda ticks: ticks * TICK)
PRIORITIES = st.sampled_from(Priority)


@FAST
@given(high_at=TIMES, normal_at=TIMES, boost=BOOSTS)
def test_priority_then_enqueue_time_with_aging(
    high_at: float, normal_at: float, boost: float
) -> None:
    # Strict score comparisons: the run-id tie-break (the store's, tests/integration/
    # test_queue_order.py) never decides these.
    high = order_score(Priority.high, high_at, boost)
    normal = order_score(Priority.normal, normal_at, boost)
    if normal_at > high_at - boost:
        # A high run precedes every normal run enqueued after (its time - boost).
        assert high < normal
    if high_at - normal_at > boost:
        # Aging: a normal run is never behind a high run enqueued more than boost after it.
        assert normal < high


@FAST
@given(first_at=TIMES, second_at=TIMES, priority=PRIORITIES, boost=BOOSTS)
def test_same_priority_runs_in_enqueue_order(
    first_at: float, second_at: float, priority: Priority, boost: float
) -> None:
    first = order_score(priority, first_at, boost)
    second = order_score(priority, second_at, boost)
    if first_at < second_at:
        assert first < second


@FAST
@given(enqueued_at=TIMES, boost=BOOSTS, priority=PRIORITIES)
def test_rescore_round_trips(enqueued_at: float, boost: float, priority: Priority) -> None:
    other = Priority.high if priority is Priority.normal else Priority.normal
    score = order_score(priority, enqueued_at, boost)
    changed = rescore(score, priority, other, boost)
    assert changed == order_score(other, enqueued_at, boost)
    assert rescore(changed, other, priority, boost) == score
    assert rescore(score, priority, priority, boost) == score


@FAST
@given(
    scores=st.lists(TIMES.map(lambda t: t - 86_400), max_size=20),
    fallback=TIMES,
)
def test_top_score_is_strictly_below_every_existing_score(
    scores: list[float], fallback: float
) -> None:
    head = min(scores) if scores else None
    top = top_score(head, fallback)
    assert all(top < score for score in scores)
    assert top <= fallback


# --- (c) queue deadlines --------------------------------------------------------------------

LIMITS = st.integers(1, 48 * 3600 * 1024).map(lambda ticks: ticks * TICK)
KINDS = st.sampled_from(ConnectionKind)


@st.composite
def deadline_inputs(draw: st.DrawFn) -> dict[str, Any]:
    enqueued_at = draw(TIMES)
    return {
        "enqueued_at": enqueued_at,
        "kind": draw(KINDS),
        "requested_timeout_s": draw(st.none() | LIMITS),
        "default_timeout_s": draw(LIMITS),
        "sign_in_timeout_s": draw(LIMITS),
        "refresh_token_expires_at": draw(
            st.none() | LIMITS.map(lambda offset: enqueued_at - 3600 + offset)
        ),
    }


@FAST
@given(inputs=deadline_inputs())
def test_queue_deadline_bounds(inputs: dict[str, Any]) -> None:
    deadline = queue_deadline(**inputs)
    enqueued_at = inputs["enqueued_at"]
    assert deadline <= enqueued_at + inputs["default_timeout_s"]
    if inputs["requested_timeout_s"] is not None:
        assert deadline <= enqueued_at + inputs["requested_timeout_s"]
    if inputs["kind"] is ConnectionKind.sign_in:
        assert deadline <= enqueued_at + inputs["sign_in_timeout_s"]
        if inputs["refresh_token_expires_at"] is not None:
            assert deadline <= inputs["refresh_token_expires_at"]
    else:
        # Nothing but the default and the request shortens a credentials run's wait.
        limit = inputs["default_timeout_s"]
        if inputs["requested_timeout_s"] is not None:
            limit = min(limit, inputs["requested_timeout_s"])
        assert deadline == enqueued_at + limit


@FAST
@given(inputs=deadline_inputs())
def test_a_requested_timeout_only_shortens(inputs: dict[str, Any]) -> None:
    without = queue_deadline(**{**inputs, "requested_timeout_s": None})
    with_request = queue_deadline(**inputs)
    assert with_request <= without
    requested = inputs["requested_timeout_s"]
    if requested is not None and inputs["enqueued_at"] + requested >= without:
        assert with_request == without


MONOTONIC_FIELDS = {
    "enqueued_at": TIMES,
    "requested_timeout_s": LIMITS,
    "default_timeout_s": LIMITS,
    "sign_in_timeout_s": LIMITS,
    "refresh_token_expires_at": TIMES,
}


@FAST
@given(inputs=deadline_inputs(), name=st.sampled_from(sorted(MONOTONIC_FIELDS)), data=st.data())
def test_queue_deadline_is_monotonic_in_each_input(
    inputs: dict[str, Any], name: str, data: st.DataObject
) -> None:
    low, high = sorted(data.draw(st.tuples(MONOTONIC_FIELDS[name], MONOTONIC_FIELDS[name])))
    assert queue_deadline(**{**inputs, name: low}) <= queue_deadline(**{**inputs, name: high})
    # No limit at all is the loosest limit there is.
    if name in ("requested_timeout_s", "refresh_token_expires_at"):
        assert queue_deadline(**{**inputs, name: high}) <= queue_deadline(**{**inputs, name: None})
