"""Machine selection (SPEC §3): per-machine verdicts, least-loaded choice, random ties, reasons."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.core.selection import (
    machine_verdict,
    placement_room,
    select_machine,
    slots_of,
)
from dispatcher.models import Connection, JoinType, Machine, MachineView, Mode, Session
from tests.support.builders import (
    ACTIVE,
    ATTENDED,
    CLIENT,
    DISCONNECTED,
    LOCKED,
    SERVER,
    UNATTENDED,
    credentials,
    effective_sessions,
    error_code_sections,
    machine,
    sign_in,
    view,
)
from tests.support.constants import OTHER_TENANT, ROBOT, SIGN_IN_USER, TENANT

pytestmark = pytest.mark.unit

OTHER = "CONTOSO\\someone-else"
CREDENTIALS = credentials()
SIGN_IN = sign_in()


@dataclass(frozen=True)
class Case:
    id: str
    view: MachineView
    mode: Mode
    expected: ErrorCode | None  # None: the machine can take the run
    connection: Connection = CREDENTIALS


VERDICTS = [
    # --- online, not in maintenance, worker key known -----------------------------------------
    Case(
        "offline",
        view(online=False, sessions=((ROBOT, ACTIVE),)),
        ATTENDED,
        ErrorCode.MachineOffline,
    ),
    Case("offline-unattended", view(online=False), UNATTENDED, ErrorCode.MachineOffline),
    Case(
        "maintenance",
        view(machine(maintenance=True), sessions=((ROBOT, ACTIVE),)),
        ATTENDED,
        ErrorCode.MachineInMaintenance,
    ),
    Case(
        "maintenance-unattended",
        view(machine(maintenance=True)),
        UNATTENDED,
        ErrorCode.MachineInMaintenance,
    ),
    # Offline wins: an operator must first know the machine is gone.
    Case(
        "offline-and-maintenance",
        view(machine(maintenance=True), online=False),
        UNATTENDED,
        ErrorCode.MachineOffline,
    ),
    Case("no-worker-key", view(has_public_key=False), UNATTENDED, ErrorCode.NoWorkerKey),
    Case("key-mismatch", view(key_mismatch=True), UNATTENDED, ErrorCode.KeyMismatch),
    # --- attended: the connection's user needs an ACTIVE session ------------------------------
    Case("attended-active", view(sessions=((ROBOT, ACTIVE),)), ATTENDED, None),
    Case(
        "attended-active-other-case",
        view(sessions=((ROBOT.upper(), ACTIVE),)),
        ATTENDED,
        None,
    ),
    Case(
        "attended-locked",
        view(sessions=((ROBOT, LOCKED),)),
        ATTENDED,
        ErrorCode.AttendedUserSessionNotActive,
    ),
    Case(
        "attended-disconnected",
        view(sessions=((ROBOT, DISCONNECTED),)),
        ATTENDED,
        ErrorCode.AttendedUserSessionNotActive,
    ),
    Case(
        "attended-one-of-two-sessions-active",
        view(sessions=((ROBOT, LOCKED), (ROBOT, ACTIVE))),
        ATTENDED,
        None,
    ),
    Case("attended-no-session", view(), ATTENDED, ErrorCode.AttendedUserNotLoggedIn),
    Case(
        "attended-only-another-users-session",
        view(sessions=((OTHER, ACTIVE),)),
        ATTENDED,
        ErrorCode.AttendedUserNotLoggedIn,
    ),
    # Attended runs use the user's session, not an unattended slot.
    Case(
        "attended-ignores-busy-unattended-slots",
        view(sessions=((ROBOT, ACTIVE),), assigned=((OTHER, UNATTENDED),)),
        ATTENDED,
        None,
    ),
    Case(
        "attended-user-already-running-a-flow-in-its-session",
        view(sessions=((ROBOT, ACTIVE),), assigned=((ROBOT, ATTENDED),)),
        ATTENDED,
        ErrorCode.UserRunInProgress,
    ),
    Case(
        "attended-user-run-in-progress-other-case",
        view(sessions=((ROBOT, ACTIVE),), assigned=((ROBOT.lower(), ATTENDED),)),
        ATTENDED,
        ErrorCode.UserRunInProgress,
    ),
    # --- attended with sign-in ----------------------------------------------------------------
    Case(
        "sign-in-active",
        view(sessions=((SIGN_IN_USER, ACTIVE),)),
        ATTENDED,
        None,
        SIGN_IN,
    ),
    Case(
        "sign-in-no-session",
        view(sessions=((OTHER, ACTIVE),)),
        ATTENDED,
        ErrorCode.NoSessionFoundForPasswordless,
        SIGN_IN,
    ),
    Case(
        "sign-in-locked",
        view(sessions=((SIGN_IN_USER, LOCKED),)),
        ATTENDED,
        ErrorCode.AttendedUserSessionNotActive,
        SIGN_IN,
    ),
    Case(
        "sign-in-disconnected",
        view(sessions=((SIGN_IN_USER.upper(), DISCONNECTED),)),
        ATTENDED,
        ErrorCode.AttendedUserSessionNotActive,
        SIGN_IN,
    ),
    # --- sign-in: tenant allow-list on AD-joined, not Entra-joined machines (per machine) -----
    Case(
        "sign-in-ad-joined-without-tenant",
        view(machine(join=JoinType.ad_joined), sessions=((SIGN_IN_USER, ACTIVE),)),
        ATTENDED,
        ErrorCode.UnallowedTenantForConnectWithSignIn,
        SIGN_IN,
    ),
    Case(
        "sign-in-ad-joined-lists-another-tenant",
        view(
            machine(join=JoinType.ad_joined, tenants=(OTHER_TENANT,)),
            sessions=((SIGN_IN_USER, ACTIVE),),
        ),
        ATTENDED,
        ErrorCode.UnallowedTenantForConnectWithSignIn,
        SIGN_IN,
    ),
    Case(
        "sign-in-ad-joined-allow-listed",
        view(
            machine(join=JoinType.ad_joined, tenants=(TENANT.upper(),)),
            sessions=((SIGN_IN_USER, ACTIVE),),
        ),
        ATTENDED,
        None,
        SIGN_IN,
    ),
    Case(
        "sign-in-hybrid-joined-needs-no-allow-list",
        view(machine(join=JoinType.hybrid_joined), sessions=((SIGN_IN_USER, ACTIVE),)),
        ATTENDED,
        None,
        SIGN_IN,
    ),
    Case(
        "sign-in-entra-joined-needs-no-allow-list",
        view(machine(join=JoinType.entra_joined), sessions=((SIGN_IN_USER, ACTIVE),)),
        ATTENDED,
        None,
        SIGN_IN,
    ),
    Case(
        "credentials-on-ad-joined-without-allow-list",
        view(machine(join=JoinType.ad_joined), sessions=((ROBOT, ACTIVE),)),
        ATTENDED,
        None,
    ),
    # --- unattended: no session of the user, a free slot ------------------------------------
    Case("unattended-idle-server", view(), UNATTENDED, None),
    Case("unattended-idle-client", view(machine(os=CLIENT)), UNATTENDED, None),
    Case(
        "unattended-user-has-active-session",
        view(sessions=((ROBOT, ACTIVE),)),
        UNATTENDED,
        ErrorCode.SessionExistsForTheUserWhenUnattended,
    ),
    Case(
        "unattended-user-session-locked",
        view(sessions=((ROBOT, LOCKED),)),
        UNATTENDED,
        ErrorCode.UnattendedUserSessionLocked,
    ),
    Case(
        "unattended-user-session-disconnected",
        view(sessions=((ROBOT, DISCONNECTED),)),
        UNATTENDED,
        ErrorCode.UnattendedUserSessionDisconnected,
    ),
    Case(
        "unattended-user-session-locked-other-case",
        view(sessions=((ROBOT.lower(), LOCKED),)),
        UNATTENDED,
        ErrorCode.UnattendedUserSessionLocked,
    ),
    Case(
        "unattended-user-session-on-client",
        view(machine(os=CLIENT), sessions=((ROBOT, DISCONNECTED),)),
        UNATTENDED,
        ErrorCode.UnattendedUserSessionDisconnected,
    ),
    # windows_client: any ACTIVE session of another user blocks unattended runs.
    Case(
        "unattended-client-other-user-active",
        view(machine(os=CLIENT), sessions=((OTHER, ACTIVE),)),
        UNATTENDED,
        ErrorCode.Win10AlreadyHasActiveSession,
    ),
    # SPEC §3 says "any active session of another user": a locked or disconnected one does not
    # block (Windows takes the console over), so the machine stays eligible.
    Case(
        "unattended-client-other-user-locked",
        view(machine(os=CLIENT), sessions=((OTHER, LOCKED),)),
        UNATTENDED,
        None,
    ),
    Case(
        "unattended-client-other-user-attended-run",
        view(machine(os=CLIENT), sessions=((OTHER, ACTIVE),), assigned=((OTHER, ATTENDED),)),
        UNATTENDED,
        ErrorCode.Win10AlreadyHasActiveSession,
    ),
    # windows_server: concurrent sessions, but only for different users.
    Case(
        "unattended-server-other-user-active",
        view(machine(slots=2), sessions=((OTHER, ACTIVE),)),
        UNATTENDED,
        None,
    ),
    Case(
        "unattended-server-other-users-unattended-run",
        view(machine(slots=2), assigned=((OTHER, UNATTENDED),)),
        UNATTENDED,
        None,
    ),
    # An assigned unattended run occupies a session of its user, even before the worker reports
    # it: a second unattended run of the same user cannot go to that machine.
    Case(
        "unattended-server-same-users-unattended-run",
        view(machine(slots=2), assigned=((ROBOT, UNATTENDED),)),
        UNATTENDED,
        ErrorCode.SessionExistsForTheUserWhenUnattended,
    ),
    Case(
        "unattended-server-same-users-unattended-run-other-case",
        view(machine(slots=5), assigned=((ROBOT.upper(), UNATTENDED),)),
        UNATTENDED,
        ErrorCode.SessionExistsForTheUserWhenUnattended,
    ),
    Case(
        "unattended-server-slots-full",
        view(machine(slots=2), assigned=((OTHER, UNATTENDED), ("CONTOSO\\third", UNATTENDED))),
        UNATTENDED,
        ErrorCode.NoFreeSlot,
    ),
    Case(
        "unattended-server-one-slot-taken",
        view(machine(slots=1), assigned=((OTHER, UNATTENDED),)),
        UNATTENDED,
        ErrorCode.NoFreeSlot,
    ),
    # Attended runs do not take unattended slots.
    Case(
        "unattended-server-attended-run-takes-no-slot",
        view(machine(slots=1), sessions=((OTHER, ACTIVE),), assigned=((OTHER, ATTENDED),)),
        UNATTENDED,
        None,
    ),
    # A Windows client runs one session: another user's unattended run makes it ineligible,
    # whatever max_unattended_runs says.
    Case(
        "unattended-client-other-users-unattended-run",
        view(machine(os=CLIENT, slots=5), assigned=((OTHER, UNATTENDED),)),
        UNATTENDED,
        ErrorCode.NoFreeSlot,
    ),
    Case(
        "unattended-client-same-users-unattended-run",
        view(machine(os=CLIENT), assigned=((ROBOT, UNATTENDED),)),
        UNATTENDED,
        ErrorCode.SessionExistsForTheUserWhenUnattended,
    ),
]


@pytest.mark.parametrize("case", VERDICTS, ids=[case.id for case in VERDICTS])
def test_machine_verdict(case: Case) -> None:
    assert machine_verdict(case.view, case.connection, case.mode) is case.expected


@pytest.mark.parametrize("case", VERDICTS, ids=[case.id for case in VERDICTS])
def test_single_machine_selection_agrees_with_verdict(case: Case) -> None:
    selection = select_machine([case.view], case.connection, case.mode, random.Random(0))
    if case.expected is None:
        assert selection.machine_id == case.view.machine_id
        assert selection.reasons == {}
    else:
        assert selection.machine_id is None
        assert selection.reasons == {case.view.machine_id: case.expected}


def test_verdict_table_covers_every_selection_code() -> None:
    """Every code of ``ErrorCode``'s section "why a machine cannot take a run" has a case, and
    the one admission code a machine's verdict also gives (its tenant allow-list)."""
    sections = error_code_sections()
    per_machine_admission = ErrorCode.UnallowedTenantForConnectWithSignIn
    assert per_machine_admission in sections["Admission"]
    selection_codes = sections["Why a machine cannot take a run right now"]
    assert len(selection_codes) > 5
    expected = selection_codes | {per_machine_admission}
    assert {case.expected for case in VERDICTS} - {None} == expected


# --- effective sessions and slots -----------------------------------------------------------


def test_effective_sessions_add_one_active_session_per_unattended_user() -> None:
    sessions = effective_sessions(
        view(
            sessions=((OTHER, LOCKED),),
            assigned=(
                (ROBOT, UNATTENDED),
                (ROBOT.upper(), UNATTENDED),  # same user: one session
                (OTHER.lower(), UNATTENDED),  # already has a reported session
                ("CONTOSO\\attended", ATTENDED),  # attended runs use an existing session
            ),
        )
    )
    assert sessions == [Session(user=OTHER, state=LOCKED), Session(user=ROBOT, state=ACTIVE)]


@pytest.mark.parametrize(
    ("machine_", "slots"),
    [
        (machine(os=SERVER, slots=1), 1),
        (machine(os=SERVER, slots=4), 4),
        (machine(os=SERVER, slots=10), 10),
        (machine(os=CLIENT, slots=1), 1),
        (machine(os=CLIENT, slots=10), 1),
    ],
)
def test_slots_of(machine_: Machine, slots: int) -> None:
    assert slots_of(view(machine_)) == slots


# --- choosing among several machines -------------------------------------------------------


def _busy(machine_id: str, runs: int) -> MachineView:
    """An eligible server with ``runs`` unattended runs of other users."""
    users = tuple((f"CONTOSO\\user{index}", UNATTENDED) for index in range(runs))
    return view(machine(machine_id, slots=10), assigned=users)


def test_least_loaded_eligible_machine_is_chosen() -> None:
    views = [_busy("m-two", 2), _busy("m-zero", 0), _busy("m-one", 1)]
    for seed in range(20):
        selection = select_machine(views, CREDENTIALS, UNATTENDED, random.Random(seed))
        assert selection.machine_id == "m-zero"
        assert selection.reasons == {}


def test_an_idle_but_ineligible_machine_is_not_chosen_over_a_busy_eligible_one() -> None:
    idle_locked = view(machine("m-idle", slots=10), sessions=((ROBOT, LOCKED),))
    views = [idle_locked, _busy("m-busy", 3)]
    selection = select_machine(views, CREDENTIALS, UNATTENDED, random.Random(0))
    assert selection.machine_id == "m-busy"
    assert selection.reasons == {"m-idle": ErrorCode.UnattendedUserSessionLocked}


def test_load_counts_attended_runs_too() -> None:
    with_attended = view(
        machine("m-attended", slots=10),
        sessions=((OTHER, ACTIVE),),
        assigned=((OTHER, ATTENDED),),
    )
    views = [with_attended, _busy("m-free", 0)]
    selection = select_machine(views, CREDENTIALS, UNATTENDED, random.Random(0))
    assert selection.machine_id == "m-free"


def test_ties_are_broken_at_random_and_every_tied_machine_gets_chosen() -> None:
    views = [_busy("m-a", 1), _busy("m-b", 1), _busy("m-c", 2)]
    chosen = {
        select_machine(views, CREDENTIALS, UNATTENDED, random.Random(seed)).machine_id
        for seed in range(64)
    }
    assert chosen == {"m-a", "m-b"}


def test_tie_break_depends_on_the_seed_not_on_the_order_machines_come_in() -> None:
    views = [_busy("m-a", 0), _busy("m-b", 0), _busy("m-c", 0)]
    for seed in range(32):
        forward = select_machine(views, CREDENTIALS, UNATTENDED, random.Random(seed))
        backward = select_machine(views[::-1], CREDENTIALS, UNATTENDED, random.Random(seed))
        assert forward.machine_id == backward.machine_id


def test_reasons_name_every_ineligible_machine_of_a_group() -> None:
    views = [
        view(machine("m-offline"), online=False),
        view(machine("m-maintenance", maintenance=True)),
        view(machine("m-locked"), sessions=((ROBOT, LOCKED),)),
        view(machine("m-disconnected"), sessions=((ROBOT, DISCONNECTED),)),
        view(machine("m-active"), sessions=((ROBOT, ACTIVE),)),
        view(machine("m-client", os=CLIENT), sessions=((OTHER, ACTIVE),)),
        view(machine("m-full", slots=1), assigned=((OTHER, UNATTENDED),)),
        view(machine("m-nokey"), has_public_key=False),
        _busy("m-eligible-busy", 1),
        _busy("m-eligible-idle", 0),
    ]
    selection = select_machine(views, CREDENTIALS, UNATTENDED, random.Random(7))
    assert selection.machine_id == "m-eligible-idle"
    assert selection.reasons == {
        "m-offline": ErrorCode.MachineOffline,
        "m-maintenance": ErrorCode.MachineInMaintenance,
        "m-locked": ErrorCode.UnattendedUserSessionLocked,
        "m-disconnected": ErrorCode.UnattendedUserSessionDisconnected,
        "m-active": ErrorCode.SessionExistsForTheUserWhenUnattended,
        "m-client": ErrorCode.Win10AlreadyHasActiveSession,
        "m-full": ErrorCode.NoFreeSlot,
        "m-nokey": ErrorCode.NoWorkerKey,
    }


def test_no_eligible_machine_leaves_the_run_queued_with_every_reason() -> None:
    views = [
        view(machine("m1"), online=False),
        view(machine("m2"), sessions=((SIGN_IN_USER, LOCKED),)),
        view(machine("m3", join=JoinType.ad_joined), sessions=((SIGN_IN_USER, ACTIVE),)),
        view(machine("m4")),
    ]
    selection = select_machine(views, SIGN_IN, ATTENDED, random.Random(0))
    assert selection.machine_id is None
    assert selection.reasons == {
        "m1": ErrorCode.MachineOffline,
        "m2": ErrorCode.AttendedUserSessionNotActive,
        "m3": ErrorCode.UnallowedTenantForConnectWithSignIn,
        "m4": ErrorCode.NoSessionFoundForPasswordless,
    }


def test_no_machines_means_no_choice_and_no_reasons() -> None:
    selection = select_machine([], CREDENTIALS, UNATTENDED, random.Random(0))
    assert selection.machine_id is None
    assert selection.reasons == {}


def test_selection_accepts_any_iterable_of_views() -> None:
    views = (v for v in [_busy("m1", 1), _busy("m2", 0)])
    assert select_machine(views, CREDENTIALS, UNATTENDED, random.Random(0)).machine_id == "m2"


# --- the why-waiting line ------------------------------------------------------------------


def test_placement_room_counts_free_unattended_slots_and_sessions_of_online_machines() -> None:
    busy = view(machine("m1", slots=2), assigned=((ROBOT, UNATTENDED),))
    full = view(machine("m2", slots=1), assigned=((ROBOT, UNATTENDED),), sessions=(("u", ACTIVE),))
    over = view(machine("m3", slots=1), assigned=((ROBOT, UNATTENDED), ("x", UNATTENDED)))
    offline = view(machine("m4", slots=5), online=False, sessions=(("u", ACTIVE),))
    client = view(machine("m5", os=CLIENT, slots=3))
    assert placement_room([busy]) == 1
    assert placement_room([full]) == 1  # no slot left, but an attended run can use the session
    assert placement_room([over]) == 0
    assert placement_room([offline]) == 0
    assert placement_room([client]) == 1  # a Windows client runs one session at a time
    assert placement_room([busy, full, over, offline, client]) == 3
    assert placement_room([]) == 0
