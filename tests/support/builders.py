"""One set of builders: machines, connections, views, fleets and requests as models, in one
line each, and fleet files (``fleet_document``) built from the same models."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import same_user
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.models import (
    AssignedRun,
    Connection,
    ConnectionKind,
    Environment,
    Group,
    JoinType,
    Machine,
    MachineView,
    Mode,
    OsKind,
    RunRequest,
    Session,
    SessionState,
    Target,
)
from tests.support.constants import OWNER, PASSWORD, ROBOT, SIGN_IN_USER, TENANT

SERVER = OsKind.windows_server
CLIENT = OsKind.windows_client
ACTIVE = SessionState.active
LOCKED = SessionState.locked
DISCONNECTED = SessionState.disconnected
ATTENDED = Mode.attended
UNATTENDED = Mode.unattended


AD_JOINED = JoinType.ad_joined
ENTRA_JOINED = JoinType.entra_joined


def machine(
    machine_id: str = "m1",
    *,
    os: OsKind = SERVER,
    join: JoinType = JoinType.entra_joined,
    tenants: tuple[str, ...] = (),
    slots: int = 1,
    maintenance: bool = False,
    group_id: str | None = None,
) -> Machine:
    return Machine(
        machine_id=machine_id,
        name=machine_id.upper(),
        group_id=group_id,
        os=os,
        join_type=join,
        allowed_registration_tenants=tenants,
        max_unattended_runs=slots,
        maintenance=maintenance,
    )


def credentials(
    connection_id: str = "c1",
    *,
    owner: str = OWNER,
    username: str = ROBOT,
    machine_id: str | None = "m1",
    group_id: str | None = None,
) -> Connection:
    return Connection(
        connection_id=connection_id,
        owner=owner,
        kind=ConnectionKind.credentials,
        target=_target(machine_id, group_id),
        username=username,
    )


def sign_in(
    connection_id: str = "s1",
    *,
    owner: str = SIGN_IN_USER,
    account: str = SIGN_IN_USER,
    tenant_id: str = TENANT,
    machine_id: str | None = "m1",
    group_id: str | None = None,
) -> Connection:
    return Connection(
        connection_id=connection_id,
        owner=owner,
        kind=ConnectionKind.sign_in,
        target=_target(machine_id, group_id),
        account=account,
        tenant_id=tenant_id,
    )


def _target(machine_id: str | None, group_id: str | None) -> Target:
    if group_id is not None:
        return Target(group_id=group_id)
    return Target(machine_id=machine_id)


def view(
    machine_: Machine | None = None,
    *,
    online: bool = True,
    sessions: tuple[tuple[str, SessionState], ...] = (),
    assigned: tuple[tuple[str, Mode], ...] = (),
    has_public_key: bool = True,
    key_mismatch: bool = False,
) -> MachineView:
    """A machine's live state; ``assigned`` lists (user, mode) of runs dispatched to it."""
    return MachineView(
        machine=machine_ or machine(),
        online=online,
        sessions=tuple(Session(user=user, state=state) for user, state in sessions),
        assigned=tuple(
            AssignedRun(run_id=f"busy-{index}", mode=mode, user=user, fence=index)
            for index, (user, mode) in enumerate(assigned)
        ),
        has_public_key=has_public_key,
        key_mismatch=key_mismatch,
    )


def effective_sessions(view: MachineView) -> list[Session]:
    """The rule ``machine_verdict`` implements with the view's indexes, spelled out: reported
    sessions, plus one active session per user an unattended run occupies."""
    sessions = list(view.sessions)
    for run in view.assigned:
        if run.mode is Mode.unattended and not any(
            same_user(session.user, run.user) for session in sessions
        ):
            sessions.append(Session(user=run.user, state=SessionState.active))
    return sessions


def session(user: str, state: SessionState | str) -> Session:
    return Session(user=user, state=SessionState(state))


def fleet(
    *,
    machines: tuple[Machine, ...] = (),
    groups: tuple[str, ...] = (),
    connections: tuple[Connection, ...] = (),
    tenant_id: str | None = TENANT,
) -> FleetSnapshot:
    return FleetSnapshot.build(
        environment=Environment(tenant_id=tenant_id) if tenant_id else None,
        groups={group_id: Group(group_id=group_id, name=group_id) for group_id in groups},
        machines={m.machine_id: m for m in machines},
        connections={c.connection_id: c for c in connections},
    )


def sort_key(score: float, run_id: str) -> tuple[float, str]:
    """How a Redis sorted set orders a queue: by score, equal scores by member."""
    return (score, run_id)


def request_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "run_id": "run-1",
        "flow_id": "flow-1",
        "connection_id": "c1",
        "requested_by": OWNER,
        "mode": "attended",
    }
    payload.update(overrides)
    return payload


def request(**overrides: Any) -> RunRequest:
    """A run request parsed the way the consumer parses it (JSON, strict)."""
    return RunRequest.model_validate_json(json.dumps(request_payload(**overrides)))


def fleet_document(
    machines: Sequence[Machine | dict[str, Any]],
    connections: Sequence[Connection | dict[str, Any]],
    groups: Sequence[Group | dict[str, Any]] = (),
    tenant: str = TENANT,
) -> dict[str, Any]:
    """A fleet file (as ``python -m dispatcher apply`` reads it) of these models; dicts are
    taken as they are. A credentials connection without a vault reference gets ``PASSWORD``."""
    return {
        "environment": {"tenant_id": tenant},
        "groups": [_entry(g) for g in groups],
        "machines": [_entry(m) for m in machines],
        "connections": [_connection_entry(c) for c in connections],
    }


def _entry(item: Machine | Group | dict[str, Any]) -> dict[str, Any]:
    return item if isinstance(item, dict) else item.model_dump(mode="json", exclude_none=True)


def _connection_entry(connection: Connection | dict[str, Any]) -> dict[str, Any]:
    if isinstance(connection, dict):
        return connection
    entry = connection.model_dump(mode="json", exclude_none=True)
    if connection.kind is ConnectionKind.credentials and connection.secret_ref is None:
        entry.pop("password_sealed", None)
        entry["password"] = PASSWORD
    return entry


def error_code_sections() -> dict[str, frozenset[ErrorCode]]:
    """``ErrorCode``'s members grouped by the comment that heads their section in its source
    (``# Admission (...)``, ``# Why a machine cannot take a run ...``, ``# Terminal outcomes.``):
    code tables in the tests are compared with these, never with lists typed into the test."""
    sections: dict[str, set[ErrorCode]] = {}
    current = ""
    for line in inspect.getsource(ErrorCode).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            current = stripped.lstrip("# ").split(" (")[0].rstrip(".")
            sections[current] = set()
        elif current and "=" in stripped and not stripped.startswith(("def", "@", "return")):
            sections[current].add(ErrorCode(stripped.split("=")[0].strip()))
    return {title: frozenset(codes) for title, codes in sections.items()}
