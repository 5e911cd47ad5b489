"""The rule engine end to end: real RabbitMQ and Redis, dispatcher and workers as
processes. Admission codes, session rules, queue deadlines (also across a dispatcher crash),
priorities, skip-ahead, throttling, queue caps, maintenance."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.models import Run, RunStatus
from dispatcher.settings import Settings
from tests.support.builders import (
    AD_JOINED,
    CLIENT,
    ENTRA_JOINED,
    SERVER,
    credentials,
    fleet_document,
    machine,
    session,
    sign_in,
)
from tests.support.constants import (
    ALICE_WIN,
    BOB_WIN,
    OTHER_TENANT,
    OWNER,
    TENANT,
)
from tests.support.e2e import (
    HOLD_S,
    acli,
    events,
    in_status,
    online,
    recorded,
    submit,
    waiting_because,
)
from tests.support.processes import (
    Processes,
    eventually,
    new_settings,
)
from tests.support.slack import bound

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SPEC_BOUND_S = bound(2.0)  # "within 2 s", with the slack of tests/support/slack.py
GATED_FLOW = f"{sys.executable} {Path(__file__).with_name('gated_flow.py')}"


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> Settings:
    """The shared fast settings, with per-test overrides via indirect parametrisation."""
    return new_settings(**getattr(request, "param", {}))


def rejected_with(run: Run, code: ErrorCode) -> None:
    assert run.status is RunStatus.rejected, run
    assert run.error is not None and run.error.code is code, run.error
    # Rejected at admission: the run never entered a queue.
    assert events(run) == ["rejected"], run.timeline


# ---- 1. admission ------------------------------------------------------------------------------
def admission_fleet(prune: bool = False) -> dict[str, Any]:
    groups = [
        {"group_id": "finance", "name": "Finance"},
        {"group_id": "adonly", "name": "AD only"},
        {"group_id": "mixed", "name": "AD and Entra"},
        {"group_id": "empty", "name": "Nobody"},
    ]
    machines = [
        machine("m1", group_id="finance", join=ENTRA_JOINED),
        machine("m2", group_id="adonly", join=AD_JOINED),
        machine(
            "m3",
            group_id="adonly",
            join=AD_JOINED,
            tenants=(OTHER_TENANT,),
        ),
        machine("m4", group_id="mixed", join=AD_JOINED),
        machine("m5", group_id="mixed", join=ENTRA_JOINED),
    ]
    if not prune:
        groups.append({"group_id": "doomed", "name": "Going away"})
        machines += [machine("m6", group_id="doomed"), machine("m7")]
    connections = [
        sign_in("s_m1", machine_id="m1", tenant_id=TENANT, owner=OWNER, account=OWNER),
        sign_in("s_foreign", machine_id="m1", tenant_id=OTHER_TENANT, owner=OWNER, account=OWNER),
        sign_in("s_adonly", group_id="adonly", tenant_id=TENANT, owner=OWNER, account=OWNER),
        sign_in("s_mixed", group_id="mixed", tenant_id=TENANT, owner=OWNER, account=OWNER),
        credentials("c_empty", group_id="empty", username=ALICE_WIN),
        credentials("c_doomed_group", group_id="doomed", username=ALICE_WIN),
        credentials("c_doomed_machine", machine_id="m7", username=ALICE_WIN),
    ]
    return fleet_document(machines=machines, connections=connections, groups=groups)


async def test_admission_rejects_at_once_with_the_spec_codes(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(admission_fleet(), "--no-signal")
    procs.dispatcher()
    procs.worker("m4")

    unattended_sign_in = await submit(client, "s_m1", "unattended")
    attended_sign_in = await submit(client, "s_m1", "attended")
    foreign_tenant = await submit(client, "s_foreign", "attended")
    ad_only = await submit(client, "s_adonly", "attended")
    mixed = await submit(client, "s_mixed", "attended")
    empty = await submit(client, "c_empty", "unattended")
    group_before = await submit(client, "c_doomed_group", "unattended")
    machine_before = await submit(client, "c_doomed_machine", "unattended")

    rejected_with(
        await in_status(client, unattended_sign_in, RunStatus.rejected),
        ErrorCode.UnattendedUnsupportedForConnectWithSignIn,
    )
    rejected_with(
        await in_status(client, foreign_tenant, RunStatus.rejected),
        ErrorCode.TenantMismatchForConnectWithSignIn,
    )
    rejected_with(
        await in_status(client, ad_only, RunStatus.rejected),
        ErrorCode.UnallowedTenantForConnectWithSignIn,
    )
    rejected_with(await in_status(client, empty, RunStatus.rejected), ErrorCode.GroupIsEmpty)
    # Controls: the same sign-in connection attended, a target where one machine could take
    # it, and the doomed targets while they exist are all admitted (they wait for machines).
    for run_id in (attended_sign_in, mixed, group_before, machine_before):
        assert (await in_status(client, run_id, RunStatus.queued)).error is None
    # On the mixed group, the AD-joined machine says why it can never take the run.
    expected = {
        "m4": "UnallowedTenantForConnectWithSignIn",
        "m5": "MachineOffline (never seen)",
    }
    run = await waiting_because(client, mixed, expected)
    assert run.status is RunStatus.queued

    # The group and the machine are deleted (their connections stay).
    apply_fleet(admission_fleet(prune=True), "--prune", "--no-signal")
    group_after = await submit(client, "c_doomed_group", "unattended")
    machine_after = await submit(client, "c_doomed_machine", "unattended")
    rejected_with(
        await in_status(client, group_after, RunStatus.rejected), ErrorCode.MachineGroupNotFound
    )
    rejected_with(
        await in_status(client, machine_after, RunStatus.rejected), ErrorCode.MachineNotFound
    )
    assert procs.executions() == []


# ---- 2. attended runs wait for an active session -----------------------------------------------
async def test_attended_run_waits_while_session_locked_and_runs_within_2s_of_unlock(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            machines=[machine("m1")],
            connections=[credentials("att", machine_id="m1", username=ALICE_WIN)],
        )
    )
    procs.dispatcher()
    procs.worker("m1", sessions=[session(ALICE_WIN, "locked")])
    await online(client, "m1", procs=procs)
    run_id = await submit(client, "att", "attended")

    run = await waiting_because(client, run_id, {"m1": "AttendedUserSessionNotActive"})
    assert run.status is RunStatus.queued and run.started_at is None
    waiting = [e for e in run.timeline if e.event == "waiting"]
    assert waiting and waiting[-1].detail == {"reasons": {"m1": "AttendedUserSessionNotActive"}}
    assert procs.executions() == []

    changed_at = time.time()
    procs.set_sessions("m1", [session(ALICE_WIN, "active")])
    run = await client.wait(run_id, timeout=20)
    assert run.status is RunStatus.succeeded, run.error
    assert run.machine_id == "m1" and run.started_at is not None
    assert run.started_at - changed_at <= SPEC_BOUND_S, run.started_at - changed_at
    assert [e["run_id"] for e in procs.executions()] == [run_id]


# ---- 3. queue deadlines ------------------------------------------------------------------------
def locked_attended_fleet() -> dict[str, Any]:
    return fleet_document(
        machines=[machine("m1")],
        connections=[credentials("att", machine_id="m1", username=ALICE_WIN)],
    )


def assert_timed_out_in_bound(run: Run, timeout_s: float, log: str = "") -> None:
    assert run.status is RunStatus.timed_out, run
    assert run.error is not None and run.error.code is ErrorCode.NoCandidateMachine
    assert run.error.detail == {"reasons": {"m1": "AttendedUserSessionNotActive"}}
    assert run.queued_at is not None and run.queue_deadline is not None
    assert run.queue_deadline - run.queued_at == pytest.approx(timeout_s, abs=0.01)
    assert run.finished_at is not None
    late = run.finished_at - run.queue_deadline
    assert 0 <= late <= SPEC_BOUND_S, f"timed out {late:.3f} s after the deadline\n{log}"
    assert events(run)[-1] == "timed_out"


async def test_run_times_out_at_its_queue_deadline_with_reasons(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(locked_attended_fleet())
    procs.dispatcher()
    procs.worker("m1", sessions=[session(ALICE_WIN, "locked")])
    await online(client, "m1", procs=procs)
    run_id = await submit(client, "att", "attended", queue_timeout_s=2)
    await waiting_because(client, run_id, {"m1": "AttendedUserSessionNotActive"})
    run = await client.wait(run_id, timeout=15)
    assert_timed_out_in_bound(run, 2, procs.log_text("dispatcher"))
    assert procs.executions() == []


async def test_deadline_is_enforced_after_the_dispatcher_is_killed_and_replaced(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(locked_attended_fleet())
    procs.dispatcher("dispatcher-1")
    procs.worker("m1", sessions=[session(ALICE_WIN, "locked")])
    await online(client, "m1", procs=procs)
    run_id = await submit(client, "att", "attended", queue_timeout_s=4)
    run = await waiting_because(client, run_id, {"m1": "AttendedUserSessionNotActive"})
    deadline = run.queue_deadline
    assert deadline is not None
    # Kill the replica shortly before the deadline, while it holds the sweeper lease; its
    # replacement starts at once and must enforce the deadline from the state in Redis.
    await eventually(lambda: time.time() >= deadline - bound(1.0), timeout=10)
    procs.kill("dispatcher-1")
    killed_at = time.time()
    assert killed_at < deadline, "the machine was too slow to kill the replica before the deadline"
    assert (await client.get(run_id)).status is RunStatus.queued
    procs.dispatcher("dispatcher-2")
    run = await client.wait(run_id, timeout=15)
    assert_timed_out_in_bound(
        run, 4, f"killed at {killed_at:.3f}\n{procs.log_text('dispatcher-2')}"
    )
    assert procs.executions() == []


# ---- 4. priority -------------------------------------------------------------------------------
def one_slot_fleet() -> dict[str, Any]:
    return fleet_document(
        machines=[machine("m1", os=SERVER, slots=1)],
        connections=[
            credentials("holder", machine_id="m1", username="CONTOSO\\svc-hold"),
            credentials("c1", machine_id="m1", username="CONTOSO\\svc"),
        ],
    )


async def test_high_priority_run_submitted_after_normal_ones_runs_first(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(one_slot_fleet())
    procs.dispatcher()
    procs.worker("m1")
    holder = await submit(client, "holder", "unattended", inputs={"duration_s": HOLD_S})
    await in_status(client, holder, RunStatus.running)

    normals = []
    for _ in range(3):
        normals.append(await submit(client, "c1", "unattended"))
        await recorded(client, normals[-1])
    high = await submit(client, "c1", "unattended", priority="high")
    await waiting_because(client, high, {"m1": "NoFreeSlot"})
    assert (await client.explain(await client.get(high))).position == 1  # type: ignore[union-attr]

    await client.cancel(holder)
    runs = await asyncio.gather(*(client.wait(r, timeout=20) for r in [high, *normals]))
    assert all(r.status is RunStatus.succeeded for r in runs), [r.status for r in runs]
    by_start = [r.run_id for r in sorted(runs, key=lambda r: r.started_at or 0)]
    assert by_start == [high, *normals]
    assert (await client.get(holder)).status is RunStatus.cancelled


# ---- 5. skip-ahead -----------------------------------------------------------------------------
async def test_attended_run_stuck_at_the_head_does_not_block_unattended_runs(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            machines=[machine("m1", slots=2)],
            connections=[
                credentials("att", machine_id="m1", username=ALICE_WIN),
                credentials("una", machine_id="m1", username="CONTOSO\\svc"),
            ],
        )
    )
    procs.dispatcher()
    procs.worker("m1", sessions=[session(ALICE_WIN, "locked")])
    await online(client, "m1", procs=procs)
    stuck = await submit(client, "att", "attended", priority="high")
    await waiting_because(client, stuck, {"m1": "AttendedUserSessionNotActive"})
    behind = [await submit(client, "una", "unattended") for _ in range(3)]
    runs = await asyncio.gather(*(client.wait(r, timeout=20) for r in behind))
    assert all(r.status is RunStatus.succeeded for r in runs), [r.error for r in runs]
    run = await client.get(stuck)
    assert run.status is RunStatus.queued
    entry = await client.explain(run)
    assert entry is not None and entry.position == 1
    assert entry.reasons == {"m1": "AttendedUserSessionNotActive"}
    assert {e["run_id"] for e in procs.executions()} == set(behind)


# ---- 6. throttling and queue caps ---------------------------------------------------------------
@pytest.mark.parametrize("settings", [{"throttle_per_minute": 3}], indirect=True)
async def test_runs_beyond_the_per_connection_rate_are_throttled(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            machines=[machine("m1")],
            connections=[
                credentials("c1", machine_id="m1", username="CONTOSO\\svc"),
                credentials("c2", machine_id="m1", username="CONTOSO\\svc2"),
            ],
        ),
        "--no-signal",
    )
    procs.dispatcher()
    # The limit counts per calendar minute of the dispatcher's clock. Seven runs in one or two
    # minutes: whatever minute boundary falls inside the burst, one minute gets four or more.
    burst = [await submit(client, "c1", "unattended") for _ in range(7)]
    other = await submit(client, "c2", "unattended")
    runs = [
        await in_status(client, r, RunStatus.queued, RunStatus.rejected) for r in [*burst, other]
    ]
    by_minute: dict[int, list[Run]] = {}
    for run in runs[:7]:
        admitted_at = run.queued_at if run.status is RunStatus.queued else run.finished_at
        assert admitted_at is not None, run
        by_minute.setdefault(int(admitted_at // 60), []).append(run)
    assert len(by_minute) <= 2, by_minute.keys()
    for minute in by_minute.values():
        statuses = [r.status for r in minute]
        # Exactly the first three of each minute are admitted, the rest throttled.
        assert statuses.count(RunStatus.queued) == min(3, len(minute)), statuses
        for run in minute:
            if run.status is RunStatus.rejected:
                rejected_with(run, ErrorCode.DesktopFlowsActionThrottled)
    assert any(r.status is RunStatus.rejected for r in runs[:7])
    assert runs[7].status is RunStatus.queued  # another connection has its own budget


@pytest.mark.parametrize("settings", [{"queue_cap": 2}], indirect=True)
async def test_a_full_queue_rejects_new_runs_with_queue_full(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            machines=[machine("m1"), machine("m2")],
            connections=[
                credentials("c1", machine_id="m1", username="CONTOSO\\svc"),
                credentials("c2", machine_id="m2", username="CONTOSO\\svc"),
            ],
        ),
        "--no-signal",
    )
    procs.dispatcher()  # no workers: every run stays queued
    first = await submit(client, "c1", "unattended")
    await in_status(client, first, RunStatus.queued)
    second = await submit(client, "c1", "unattended")
    await in_status(client, second, RunStatus.queued)
    third = await submit(client, "c1", "unattended")
    rejected_with(await in_status(client, third, RunStatus.rejected), ErrorCode.QueueFull)
    elsewhere = await submit(client, "c2", "unattended")  # the cap is per target
    await in_status(client, elsewhere, RunStatus.queued)
    await client.cancel(first)
    fourth = await submit(client, "c1", "unattended")
    await in_status(client, fourth, RunStatus.queued)


# ---- 7. maintenance ----------------------------------------------------------------------------
async def test_maintenance_lets_running_runs_finish_and_queues_new_ones(
    client: Client, procs: Processes, apply_fleet: Any, tmp_path: Path
) -> None:
    apply_fleet(
        fleet_document(
            machines=[machine("m1", slots=3)],
            connections=[
                credentials("c1", machine_id="m1", username="CONTOSO\\svc1"),
                credentials("c2", machine_id="m1", username="CONTOSO\\svc2"),
                credentials("c3", machine_id="m1", username="CONTOSO\\svc3"),
            ],
        )
    )
    procs.dispatcher()
    procs.worker("m1", executor="command", extra=["--command", GATED_FLOW])
    release = tmp_path / "release"
    running = await submit(client, "c1", "unattended", inputs={"release_file": str(release)})
    await in_status(client, running, RunStatus.running)

    out = await acli(procs, "machines", "maintenance", "m1", "on")
    assert "maintenance on" in out.stdout
    waiting = await submit(client, "c2", "unattended")
    await waiting_because(client, waiting, {"m1": "MachineInMaintenance"})
    assert (await client.get(running)).status is RunStatus.running

    release.touch()  # the running flow ends on its own, in maintenance
    finished = await client.wait(running, timeout=20)
    assert finished.status is RunStatus.succeeded, finished.error
    assert finished.outputs == {"released": True}
    assert finished.finished_at is not None
    # A slot is free now, and the machine still takes nothing new.
    later = await submit(client, "c3", "unattended")
    await waiting_because(client, later, {"m1": "MachineInMaintenance"})
    assert (await client.get(waiting)).status is RunStatus.queued

    await acli(procs, "machines", "maintenance", "m1", "off")
    runs = await asyncio.gather(client.wait(waiting, timeout=20), client.wait(later, timeout=20))
    assert [r.status for r in runs] == [RunStatus.succeeded, RunStatus.succeeded]
    assert all(r.started_at and r.started_at > finished.finished_at for r in runs)


# ---- 9. Windows client vs server sessions -------------------------------------------------------
async def test_windows_client_with_another_users_active_session_waits_server_does_not(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            machines=[
                machine("desk", os=CLIENT, slots=1),
                machine("srv", os=SERVER, slots=2),
            ],
            connections=[
                credentials("on_desk", machine_id="desk", username="CONTOSO\\svc"),
                credentials("on_srv", machine_id="srv", username="CONTOSO\\svc"),
            ],
        )
    )
    procs.dispatcher()
    bob_active = [session(BOB_WIN, "active")]
    procs.worker("desk", sessions=bob_active)
    procs.worker("srv", sessions=bob_active)
    await online(client, "desk", "srv", procs=procs)

    on_server = await submit(client, "on_srv", "unattended")
    on_client = await submit(client, "on_desk", "unattended")
    assert (await client.wait(on_server, timeout=20)).status is RunStatus.succeeded
    await waiting_because(client, on_client, {"desk": "Win10AlreadyHasActiveSession"})
    assert [e["run_id"] for e in procs.executions()] == [on_server]

    procs.set_sessions("desk", [])  # bob signs out
    run = await client.wait(on_client, timeout=20)
    assert run.status is RunStatus.succeeded and run.machine_id == "desk"
