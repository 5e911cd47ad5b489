"""Machine selection (SPEC §3): which machine of the target takes a run, or why none can.

Power Automate's documented rules, then: least loaded first, ties broken at random. A run
that occupies a machine (dispatched or running) counts as a session of its user, as it would
on a real machine, so later decisions see it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import tenant_blocked
from dispatcher.models import (
    Connection,
    ConnectionKind,
    Machine,
    MachineView,
    Mode,
    OsKind,
    SessionState,
)

_UNATTENDED_SESSION_CODES = {
    SessionState.active: ErrorCode.SessionExistsForTheUserWhenUnattended,
    SessionState.locked: ErrorCode.UnattendedUserSessionLocked,
    SessionState.disconnected: ErrorCode.UnattendedUserSessionDisconnected,
}


@dataclass(frozen=True)
class Selection:
    """The chosen machine (or None) and, for every machine not chosen, why not."""

    machine_id: str | None
    reasons: dict[str, ErrorCode] = field(default_factory=dict)


def slots_of(view: MachineView) -> int:
    """Unattended slots of the machine seen."""
    return machine_slots(view.machine)


def machine_slots(machine: Machine) -> int:
    """Unattended slots: a Windows client machine runs one session at a time."""
    if machine.os is OsKind.windows_client:
        return 1
    return machine.max_unattended_runs


def machine_verdict(view: MachineView, connection: Connection, mode: Mode) -> ErrorCode | None:
    """Why ``view`` cannot take a run of ``connection`` in ``mode`` now, or None if it can."""
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
    user = connection.session_user.casefold()
    own = view.session_states.get(user, ())
    if mode is Mode.attended:
        if not own:
            if connection.kind is ConnectionKind.sign_in:
                return ErrorCode.NoSessionFoundForPasswordless
            return ErrorCode.AttendedUserNotLoggedIn
        if SessionState.active not in own:
            return ErrorCode.AttendedUserSessionNotActive
        if user in view.occupying_users:
            return ErrorCode.UserRunInProgress
        return None
    # The user's first session: a reported one, else the one an unattended run of theirs
    # holds (an unattended run occupies a session of its user, as on a real machine).
    if own:
        return _UNATTENDED_SESSION_CODES[own[0]]
    if user in view.unattended_users:
        return _UNATTENDED_SESSION_CODES[SessionState.active]
    if view.unattended_in_use >= slots_of(view):
        return ErrorCode.NoFreeSlot
    if view.machine.os is OsKind.windows_client and (
        any(SessionState.active in states for states in view.session_states.values())
        or any(other not in view.session_states for other in view.unattended_users)
    ):
        return ErrorCode.Win10AlreadyHasActiveSession
    return None


def placement_room(views: Iterable[MachineView]) -> int:
    """How many runs, of any connection, these machines could take now at the most.

    A placement takes a free unattended slot or an attended session of an online machine.
    """
    return sum(
        max(0, slots_of(view) - view.unattended_in_use) + len(view.sessions)
        for view in views
        if view.online
    )


def select_machine(
    views: Iterable[MachineView],
    connection: Connection,
    mode: Mode,
    rng: random.Random | None = None,
) -> Selection:
    """Pick the least loaded eligible machine, ties at random; say why the others cannot."""
    reasons: dict[str, ErrorCode] = {}
    eligible: list[MachineView] = []
    for view in views:
        verdict = machine_verdict(view, connection, mode)
        if verdict is None:
            eligible.append(view)
        else:
            reasons[view.machine_id] = verdict
    if not eligible:
        return Selection(machine_id=None, reasons=reasons)
    lightest = min(view.load for view in eligible)
    candidates = sorted(view.machine_id for view in eligible if view.load == lightest)
    chosen = (rng or random).choice(candidates)
    return Selection(machine_id=chosen, reasons=reasons)
