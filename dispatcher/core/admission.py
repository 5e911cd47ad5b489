"""Admission: fail fast at submit time with a final error code (SPEC §3).

Throttling, queue caps and duplicate run ids need shared state and are checked atomically in
the store; everything that depends only on the request and the fleet is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.codes import ErrorCode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.models import Connection, ConnectionKind, JoinType, Machine, Mode, RunRequest


@dataclass(frozen=True)
class Rejection:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Acceptance:
    connection: Connection
    target: str


def same_user(left: str, right: str) -> bool:
    """User principals and Windows accounts compare case-insensitively."""
    return left.casefold() == right.casefold()


def tenant_blocked(machine: Machine, connection: Connection) -> bool:
    """An AD-joined (not Entra-joined) machine only takes sign-in runs of allow-listed tenants."""
    if connection.kind is not ConnectionKind.sign_in or machine.join_type is not JoinType.ad_joined:
        return False
    allowed = {tenant.casefold() for tenant in machine.allowed_registration_tenants}
    return (connection.tenant_id or "").casefold() not in allowed


def admit(
    request: RunRequest, fleet: FleetSnapshot, max_run_cap_s: float | None = None
) -> Acceptance | Rejection:
    """Decide whether a valid request may be queued, and for which target. A ``max_run_s``
    above ``max_run_cap_s`` is rejected (a run time limit the dispatcher will not honour)."""
    if (
        max_run_cap_s is not None
        and request.max_run_s is not None
        and request.max_run_s > max_run_cap_s
    ):
        return Rejection(
            ErrorCode.InvalidRunRequest,
            f"max_run_s {request.max_run_s:g} s is above the limit of {max_run_cap_s:g} s",
        )
    connection = fleet.connections.get(request.connection_id)
    if connection is None:
        return Rejection(
            ErrorCode.ConnectionNotFound, f"connection {request.connection_id!r} does not exist"
        )
    if not same_user(request.requested_by, connection.owner):
        return Rejection(
            ErrorCode.ConnectionAccessDenied,
            f"{request.requested_by!r} is not the owner of connection {connection.connection_id!r}",
        )
    if connection.kind is ConnectionKind.sign_in:
        if request.mode is Mode.unattended:
            return Rejection(
                ErrorCode.UnattendedUnsupportedForConnectWithSignIn,
                "connect-with-sign-in connections can only run attended",
            )
        environment_tenant = fleet.environment.tenant_id if fleet.environment else None
        if (
            environment_tenant is None
            or (connection.tenant_id or "").casefold() != environment_tenant.casefold()
        ):
            return Rejection(
                ErrorCode.TenantMismatchForConnectWithSignIn,
                "the sign-in account's tenant is not the environment's tenant",
            )
    target = connection.target
    if not fleet.target_exists(target):
        if target.machine_id is not None:
            return Rejection(
                ErrorCode.MachineNotFound, f"machine {target.machine_id!r} does not exist"
            )
        return Rejection(
            ErrorCode.MachineGroupNotFound, f"machine group {target.group_id!r} does not exist"
        )
    machine_ids = fleet.machine_ids_of(target)
    if not machine_ids:
        return Rejection(ErrorCode.GroupIsEmpty, f"machine group {target.group_id!r} is empty")
    if connection.kind is ConnectionKind.sign_in and all(
        tenant_blocked(fleet.machines[machine_id], connection) for machine_id in machine_ids
    ):
        return Rejection(
            ErrorCode.UnallowedTenantForConnectWithSignIn,
            "every machine of the target is AD-joined without the tenant in its allow-list",
        )
    return Acceptance(connection=connection, target=target.key)
