"""Machine liveness end to end: a machine whose worker stops heartbeating.

The worker of ``m1`` is frozen (SIGSTOP) while it runs one flow and while three more runs are
handed to it. Once the dispatcher notices the silence, the runs it never started go back to
the queue at their old position (ahead of runs queued after them) and run on ``m2``; the run
it was running fails with ``MachineLost`` after the grace period. Then the frozen worker is
SIGKILLed and restarted (or simply resumed): it finds the stale assignments in its queue (or
in its prefetch buffer) and refuses them (the fenced start), so nothing runs twice.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import Run, RunStatus
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import OWNER
from tests.support.processes import (
    Processes,
    eventually,
    new_settings,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

OFFLINE_AFTER_S = 3.0
GRACE_S = 2.0
CONNECTIONS = ("c1", "c2", "c3", "c4")


@pytest.fixture
def settings() -> Settings:
    return new_settings(offline_after_s=OFFLINE_AFTER_S, running_grace_s=GRACE_S)


def fleet() -> dict[str, Any]:
    # One Windows user per connection: a user runs one unattended session per machine.
    return fleet_document(
        groups=[{"group_id": "g", "name": "Bots"}],
        machines=[
            {
                "machine_id": "m1",
                "name": "BOT-01",
                "group_id": "g",
                "os": "windows_server",
                "max_unattended_runs": 4,
            },
            {
                "machine_id": "m2",
                "name": "BOT-02",
                "group_id": "g",
                "os": "windows_server",
                "max_unattended_runs": 1,
            },
        ],
        connections=[
            {
                "connection_id": connection_id,
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "g"},
                "username": f"CONTOSO\\svc-{connection_id}",
                "password": "s3cret-pw",
            }
            for connection_id in CONNECTIONS
        ],
    )


async def submit(client: Client, name: str, connection_id: str, duration_s: float) -> str:
    return await client.submit(
        connection_id=connection_id,
        flow_id="flow",
        requested_by=OWNER,
        mode="unattended",
        inputs={"duration_s": duration_s},
        run_id=f"{name}-{time.time_ns()}",
    )


async def status_is(client: Client, run_id: str, status: RunStatus) -> Run | None:
    try:
        run = await client.get(run_id)
    except Exception:
        return None
    return run if run.status is status else None


@pytest.mark.parametrize("comeback", ["restarted", "resumed"])
async def test_a_silent_machine_gives_back_unstarted_runs_and_loses_running_ones(
    client: Client, procs: Processes, apply_fleet: Any, comeback: str
) -> None:
    apply_fleet(fleet())
    procs.dispatcher()
    worker = procs.worker("m1")  # m2's worker is not started yet: never seen, offline

    long_run = await submit(client, "long", "c1", 60)
    await eventually(lambda: status_is(client, long_run, RunStatus.running), timeout=30)
    # Its flow has begun (the ledger records the start just before the flow runs).
    await eventually(lambda: any(e["run_id"] == long_run for e in procs.executions()), timeout=10)

    os.killpg(worker.pid, signal.SIGSTOP)  # frozen: no heartbeat, consumes nothing
    frozen_at = time.time()
    # Handed to m1 before the dispatcher notices the silence; m1 never starts them.
    handed = [await submit(client, f"handed{i}", c, 0.05) for i, c in enumerate(CONNECTIONS[1:])]
    for run_id in handed:
        run = await eventually(
            lambda r=run_id: status_is(client, r, RunStatus.dispatched), timeout=5, interval=0.02
        )
        assert run.machine_id == "m1"
    # Queued after them (their users are busy on m1, and m2 is offline).
    later = [await submit(client, f"later{i}", c, 0.05) for i, c in enumerate(CONNECTIONS[1:])]
    for run_id in later:
        await eventually(lambda r=run_id: status_is(client, r, RunStatus.queued), timeout=10)

    # Offline: the unstarted runs go back to the queue, ahead of the later ones.
    for run_id in handed:
        run = await eventually(
            lambda r=run_id: status_is(client, r, RunStatus.queued), timeout=OFFLINE_AFTER_S + 10
        )
        requeued = [e for e in run.timeline if e.event == "requeued"]
        assert requeued and requeued[-1].detail == {"reason": "machine offline", "machine_id": "m1"}
        assert run.machine_id is None
    assert [e.run_id for e in await client.queue("g:g")] == handed + later

    # The running run fails after the grace period.
    lost = await eventually(
        lambda: status_is(client, long_run, RunStatus.failed),
        timeout=OFFLINE_AFTER_S + GRACE_S + 10,
    )
    assert lost.error is not None and lost.error.code.value == "MachineLost"
    assert lost.finished_at is not None
    assert lost.finished_at - frozen_at >= OFFLINE_AFTER_S + GRACE_S - 0.5

    # m2 comes online and runs everything, one at a time, in queue order.
    procs.worker("m2")
    for run_id in handed + later:
        run = await client.wait(run_id, timeout=30)
        assert run.status is RunStatus.succeeded and run.machine_id == "m2"
    on_m2 = [e["run_id"] for e in procs.executions() if e["machine"] == "m2"]
    assert on_m2 == handed + later

    # The frozen worker comes back, killed and restarted or resumed as it was (with the
    # assignments it had prefetched): either way its stale assignments are refused.
    if comeback == "restarted":
        procs.kill("worker-m1")
        procs.worker("m1")
    else:
        os.killpg(worker.pid, signal.SIGCONT)

    def refused_all() -> bool:
        log = procs.log_text("worker-m1")
        return all(f"refusing run {run_id}" in log for run_id in handed)

    await eventually(refused_all, timeout=30)
    if comeback == "resumed":
        # The resumed worker still had the long flow running: it learns that the dispatcher
        # failed that run and stops the flow instead of keeping the robot busy.
        await eventually(
            lambda: (
                f"run {long_run} is failed for the dispatcher; stopping its flow here"
                in procs.log_text("worker-m1")
            ),
            timeout=30,
        )
    marker = await submit(client, "marker", "c1", 0.05)
    assert (await client.wait(marker, timeout=30)).status is RunStatus.succeeded

    started = [(e["run_id"], e["machine"]) for e in procs.executions()]
    assert started.count((long_run, "m1")) == 1
    for run_id in handed + later:
        assert [m for r, m in started if r == run_id] == ["m2"], (run_id, started)
    assert (await client.get(long_run)).status is RunStatus.failed
