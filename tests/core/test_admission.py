"""Admission: every request-and-fleet rule of SPEC §3 decides at submit time, with its code."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import Acceptance, Rejection, admit, same_user, tenant_blocked
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.models import Connection, JoinType, Machine
from tests.support.builders import (
    credentials,
    error_code_sections,
    fleet,
    machine,
    request,
    sign_in,
)
from tests.support.constants import OTHER_TENANT, OWNER, SIGN_IN_USER, TENANT

pytestmark = pytest.mark.unit

AD = JoinType.ad_joined
ENTRA = JoinType.entra_joined
HYBRID = JoinType.hybrid_joined
WORKGROUP = JoinType.workgroup


@dataclass(frozen=True)
class Case:
    id: str
    connection: Connection | None
    machines: tuple[Machine, ...] = ()
    groups: tuple[str, ...] = ()
    requested_by: str = OWNER
    mode: str = "attended"
    tenant_id: str | None = TENANT
    expected: ErrorCode | None = None  # None: accepted
    target: str | None = None  # the queue key an accepted run goes to

    def fleet(self) -> FleetSnapshot:
        connections = (self.connection,) if self.connection else ()
        return fleet(
            machines=self.machines,
            groups=self.groups,
            connections=connections,
            tenant_id=self.tenant_id,
        )


def _group(*joins: JoinType, tenants: tuple[str, ...] = ()) -> tuple[Machine, ...]:
    return tuple(
        machine(f"g{index}", join=join, tenants=tenants, group_id="finance")
        for index, join in enumerate(joins)
    )


SIGN_IN_GROUP = sign_in(machine_id=None, group_id="finance")

CASES = [
    # --- accepted ---------------------------------------------------------------------------
    Case("credentials-machine", credentials(), (machine("m1"),), target="m:m1"),
    Case(
        "credentials-group",
        credentials(machine_id=None, group_id="finance"),
        _group(ENTRA, AD),
        groups=("finance",),
        target="g:finance",
    ),
    Case(
        "credentials-unattended", credentials(), (machine("m1"),), mode="unattended", target="m:m1"
    ),
    Case(
        "owner-compared-case-insensitively",
        credentials(),
        (machine("m1"),),
        requested_by=OWNER.upper(),
        target="m:m1",
    ),
    Case(
        "sign-in-attended",
        sign_in(),
        (machine("m1"),),
        requested_by=SIGN_IN_USER,
        target="m:m1",
    ),
    Case(
        "sign-in-tenant-compared-case-insensitively",
        sign_in(tenant_id=TENANT.upper()),
        (machine("m1"),),
        requested_by=SIGN_IN_USER,
        target="m:m1",
    ),
    # The tenant rule is about sign-in connections only.
    Case(
        "credentials-on-ad-joined-without-allow-list",
        credentials(),
        (machine("m1", join=AD),),
        target="m:m1",
    ),
    # --- ConnectionNotFound -----------------------------------------------------------------
    Case("unknown-connection", None, (machine("m1"),), expected=ErrorCode.ConnectionNotFound),
    # --- ConnectionAccessDenied -------------------------------------------------------------
    Case(
        "not-the-owner",
        credentials(),
        (machine("m1"),),
        requested_by="mallory@contoso.com",
        expected=ErrorCode.ConnectionAccessDenied,
    ),
    # A stranger learns nothing about the connection's kind or target.
    Case(
        "not-the-owner-of-a-sign-in-connection-run-unattended",
        sign_in(),
        (),
        requested_by="mallory@contoso.com",
        mode="unattended",
        expected=ErrorCode.ConnectionAccessDenied,
    ),
    # --- UnattendedUnsupportedForConnectWithSignIn ------------------------------------------
    Case(
        "sign-in-unattended",
        sign_in(),
        (machine("m1"),),
        requested_by=SIGN_IN_USER,
        mode="unattended",
        expected=ErrorCode.UnattendedUnsupportedForConnectWithSignIn,
    ),
    Case(
        "sign-in-unattended-even-with-other-problems",
        sign_in(tenant_id=OTHER_TENANT),
        (),
        requested_by=SIGN_IN_USER,
        mode="unattended",
        expected=ErrorCode.UnattendedUnsupportedForConnectWithSignIn,
    ),
    # --- TenantMismatchForConnectWithSignIn -------------------------------------------------
    Case(
        "sign-in-tenant-differs",
        sign_in(tenant_id=OTHER_TENANT),
        (machine("m1"),),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.TenantMismatchForConnectWithSignIn,
    ),
    # No environment tenant configured: nothing can match, so the run cannot be trusted.
    Case(
        "sign-in-without-environment-tenant",
        sign_in(),
        (machine("m1"),),
        requested_by=SIGN_IN_USER,
        tenant_id=None,
        expected=ErrorCode.TenantMismatchForConnectWithSignIn,
    ),
    Case(
        "credentials-need-no-environment-tenant",
        credentials(),
        (machine("m1"),),
        tenant_id=None,
        target="m:m1",
    ),
    # --- MachineNotFound / MachineGroupNotFound ---------------------------------------------
    Case("machine-deleted", credentials(), (machine("m2"),), expected=ErrorCode.MachineNotFound),
    Case(
        "group-deleted",
        credentials(machine_id=None, group_id="finance"),
        (),
        expected=ErrorCode.MachineGroupNotFound,
    ),
    # Machines still name the group, but the group itself is gone.
    Case(
        "group-deleted-with-members-left",
        credentials(machine_id=None, group_id="finance"),
        _group(ENTRA),
        expected=ErrorCode.MachineGroupNotFound,
    ),
    Case(
        "sign-in-machine-deleted",
        sign_in(),
        (),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.MachineNotFound,
    ),
    # --- GroupIsEmpty -----------------------------------------------------------------------
    Case(
        "group-empty",
        credentials(machine_id=None, group_id="finance"),
        (machine("m1", group_id="other"),),
        groups=("finance", "other"),
        expected=ErrorCode.GroupIsEmpty,
    ),
    Case(
        "sign-in-group-empty",
        SIGN_IN_GROUP,
        (),
        groups=("finance",),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.GroupIsEmpty,
    ),
    # --- UnallowedTenantForConnectWithSignIn: only when EVERY machine is blocked --------------
    Case(
        "sign-in-single-ad-machine-without-tenant",
        sign_in(),
        (machine("m1", join=AD),),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.UnallowedTenantForConnectWithSignIn,
    ),
    Case(
        "sign-in-ad-machine-lists-another-tenant",
        sign_in(),
        (machine("m1", join=AD, tenants=(OTHER_TENANT,)),),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.UnallowedTenantForConnectWithSignIn,
    ),
    Case(
        "sign-in-group-all-ad-without-tenant",
        SIGN_IN_GROUP,
        _group(AD, AD, AD),
        groups=("finance",),
        requested_by=SIGN_IN_USER,
        expected=ErrorCode.UnallowedTenantForConnectWithSignIn,
    ),
    Case(
        "sign-in-ad-machine-allow-lists-tenant",
        sign_in(),
        (machine("m1", join=AD, tenants=(OTHER_TENANT, TENANT.upper())),),
        requested_by=SIGN_IN_USER,
        target="m:m1",
    ),
    Case(
        "sign-in-group-one-entra-machine-is-enough",
        SIGN_IN_GROUP,
        _group(AD, AD, ENTRA),
        groups=("finance",),
        requested_by=SIGN_IN_USER,
        target="g:finance",
    ),
    # Hybrid-joined machines are Entra-joined too: the allow-list does not apply.
    Case(
        "sign-in-group-one-hybrid-machine-is-enough",
        SIGN_IN_GROUP,
        _group(AD, HYBRID),
        groups=("finance",),
        requested_by=SIGN_IN_USER,
        target="g:finance",
    ),
    Case(
        "sign-in-hybrid-machine",
        sign_in(),
        (machine("m1", join=HYBRID),),
        requested_by=SIGN_IN_USER,
        target="m:m1",
    ),
    # SPEC §3 names AD-joined machines only; a workgroup machine is not AD-joined, so the
    # allow-list rule does not reject it (whether the sign-in then works is the machine's call).
    Case(
        "sign-in-workgroup-machine",
        sign_in(),
        (machine("m1", join=WORKGROUP),),
        requested_by=SIGN_IN_USER,
        target="m:m1",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_admission(case: Case) -> None:
    connection_id = case.connection.connection_id if case.connection else "c-unknown"
    run = request(connection_id=connection_id, mode=case.mode, requested_by=case.requested_by)
    decision = admit(run, case.fleet())

    if case.expected is None:
        assert isinstance(decision, Acceptance), decision
        assert decision.target == case.target
        assert decision.connection == case.connection
    else:
        assert isinstance(decision, Rejection), decision
        assert decision.code is case.expected
        assert decision.message


def test_admission_codes_cover_every_fleet_rule() -> None:
    """The table exercises every admission code of ``ErrorCode`` the pure core decides: all of
    the admission section but the ones decided elsewhere, each tested there."""
    elsewhere = {
        ErrorCode.InvalidRunRequest: "core.decode (tests/unit/test_intake.py)",
        ErrorCode.DesktopFlowsActionThrottled: "admit.lua (tests/integration/test_store_contract)",
        ErrorCode.QueueFull: "admit.lua (tests/integration/test_store_contract)",
    }
    admission_codes = error_code_sections()["Admission"]
    assert set(elsewhere) <= admission_codes
    assert {case.expected for case in CASES} - {None} == admission_codes - set(elsewhere)


@pytest.mark.parametrize(
    ("join", "tenants", "connection", "blocked"),
    [
        (AD, (), sign_in(), True),
        (AD, (OTHER_TENANT,), sign_in(), True),
        (AD, (TENANT,), sign_in(), False),
        (AD, (TENANT.upper(),), sign_in(), False),
        (AD, (), sign_in(tenant_id=TENANT.upper()), True),
        (AD, (TENANT.lower(),), sign_in(tenant_id=TENANT.upper()), False),
        (ENTRA, (), sign_in(), False),
        (HYBRID, (), sign_in(), False),
        (WORKGROUP, (), sign_in(), False),
        (AD, (), credentials(), False),
    ],
)
def test_tenant_blocked(
    join: JoinType, tenants: tuple[str, ...], connection: Connection, blocked: bool
) -> None:
    assert tenant_blocked(machine("m1", join=join, tenants=tenants), connection) is blocked


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        ("alice@contoso.com", "alice@contoso.com", True),
        ("Alice@Contoso.COM", "alice@contoso.com", True),
        ("CONTOSO\\svc-fin", "contoso\\SVC-FIN", True),
        ("STRASSE\\user", "strasse\\USER", True),
        ("alice@contoso.com", "alice@contoso.org", False),
        ("CONTOSO\\svc-fin", "CONTOSO\\svc-hr", False),
    ],
)
def test_same_user(left: str, right: str, same: bool) -> None:
    assert same_user(left, right) is same
    assert same_user(right, left) is same
