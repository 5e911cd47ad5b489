"""The operator CLI on the real services: why a run waits, queue views, reordering queues."""

from __future__ import annotations

import asyncio
import calendar
import time
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import RunStatus
from tests.support.builders import (
    credentials,
    fleet_document,
    machine,
    session,
)
from tests.support.constants import (
    ALICE_WIN,
)
from tests.support.e2e import (
    HOLD_S,
    acli,
    acli_json,
    in_status,
    online,
    recorded,
    submit,
    waiting_because,
)
from tests.support.processes import (
    Processes,
    eventually,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

QUEUE_TIMEOUT_S = 600
NO_SLOT = {"m1": "NoFreeSlot"}


def one_slot_fleet() -> dict[str, Any]:
    return fleet_document(
        machines=[machine("m1", slots=1)],
        connections=[
            credentials("holder", machine_id="m1", username="CONTOSO\\svc-hold"),
            credentials("c1", machine_id="m1", username="CONTOSO\\svc"),
        ],
    )


async def positions(procs: Processes, *run_ids: str) -> list[int]:
    shown = await asyncio.gather(*(acli_json(procs, "runs", "show", r) for r in run_ids))
    return [s["queue"]["position"] for s in shown]


async def test_queue_show_priority_and_move_to_top(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(one_slot_fleet())
    procs.dispatcher()
    procs.worker("m1")
    holder = await submit(client, "holder", "unattended", inputs={"duration_s": HOLD_S})
    await in_status(client, holder, RunStatus.running)
    n1, n2, n3 = [
        await submit(client, "c1", "unattended", queue_timeout_s=QUEUE_TIMEOUT_S) for _ in range(3)
    ]
    for run_id in (n1, n2, n3):
        await recorded(client, run_id)
    await waiting_because(client, n1, NO_SLOT)

    # queue show --json: per target, in dispatch order, with everything an operator needs.
    shown, filtered, queue_text, data, run_text = await asyncio.gather(
        acli_json(procs, "queue", "show"),
        acli_json(procs, "queue", "show", "--target", "m:m1"),
        acli(procs, "queue", "show"),
        acli_json(procs, "runs", "show", n1),
        acli(procs, "runs", "show", n1),
    )
    assert {e["target"] for e in shown} == {"m:m1"}
    assert [e["run_id"] for e in shown] == [n1, n2, n3]
    assert [e["position"] for e in shown] == [1, 2, 3]
    runs = {r: await client.get(r) for r in (n1, n2, n3)}
    for entry in shown:
        run = runs[entry["run_id"]]
        assert entry["priority"] == "normal" and entry["mode"] == "unattended"
        assert entry["connection_id"] == "c1"
        assert entry["queue_deadline"] == pytest.approx(run.queue_deadline)
        assert run.queue_deadline == pytest.approx((run.queued_at or 0) + QUEUE_TIMEOUT_S)
        assert entry["waited_s"] >= 0
        assert entry["reasons"] == NO_SLOT
    assert shown[0]["waited_s"] >= shown[1]["waited_s"] >= shown[2]["waited_s"]
    assert [e["run_id"] for e in filtered] == [n1, n2, n3]
    text = queue_text.stdout
    assert n1 in text and "NoFreeSlot" in text and "m:m1" in text

    # runs show: position and why, per machine.
    assert data["status"] == "queued"
    assert data["queue"]["position"] == 1 and data["queue"]["reasons"] == NO_SLOT
    text = run_text.stdout
    assert "position   1 in m:m1" in text and "waiting because:" in text
    assert "m1" in text and "NoFreeSlot" in text

    # queue priority: the last normal run becomes high and goes first.
    out = await acli(procs, "queue", "priority", n3, "high")
    assert "priority high, position 1" in out.stdout
    assert await positions(procs, n1, n2, n3) == [2, 3, 1]
    assert (await client.get(n3)).priority.value == "high"

    # queue move-to-top: ahead of the high one too.
    out = await acli(procs, "queue", "move-to-top", n2)
    assert "position 1" in out.stdout
    assert await positions(procs, n1, n2, n3) == [3, 1, 2]

    # The timeline records the queue events.
    waiting = [e for e in (await client.get(n1)).timeline if e.event == "waiting"]
    assert waiting and waiting[0].detail == {"reasons": NO_SLOT}
    changed = [e for e in (await client.get(n3)).timeline if e.event == "priority_changed"]
    assert len(changed) == 1
    assert [e.event for e in (await client.get(n2)).timeline].count("moved_to_top") == 1

    # The new order is the order in which they run once the slot frees.
    await client.cancel(holder)
    done = await asyncio.gather(*(client.wait(r, timeout=20) for r in (n1, n2, n3)))
    assert all(r.status is RunStatus.succeeded for r in done)
    by_start = [r.run_id for r in sorted(done, key=lambda r: r.started_at or 0)]
    assert by_start == [n2, n3, n1]
    finished, queues = await asyncio.gather(
        acli_json(procs, "runs", "show", n1), acli_json(procs, "queue", "show")
    )
    assert finished["queue"] is None and queues == []


async def test_runs_show_names_the_locked_session_and_the_offline_machine(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(
        fleet_document(
            groups=[{"group_id": "desk", "name": "Desks"}],
            machines=[machine("m1", group_id="desk"), machine("m2", group_id="desk")],
            connections=[credentials("att", group_id="desk", username=ALICE_WIN)],
        )
    )
    procs.dispatcher()
    procs.worker("m1", sessions=[session(ALICE_WIN, "locked")])
    procs.worker("m2", sessions=[session(ALICE_WIN, "locked")])
    await online(client, "m1", "m2", procs=procs)
    run_id = await submit(client, "att", "attended")
    locked = {"m1": "AttendedUserSessionNotActive", "m2": "AttendedUserSessionNotActive"}
    await waiting_because(client, run_id, locked)
    data = await acli_json(procs, "runs", "show", run_id)
    assert data["status"] == "queued" and data["queue"]["reasons"] == locked

    # m2's worker dies: the record says since when m2 is offline.
    procs.kill("worker-m2")
    killed_at = time.time()

    async def offline_reason() -> str | None:
        shown = await acli_json(procs, "runs", "show", run_id)
        reason = str(shown["queue"]["reasons"].get("m2", ""))
        return reason if reason.startswith("MachineOffline since ") else None

    reason = await eventually(offline_reason, timeout=20, interval=0.3)
    # Offline since its last heartbeat plus the offline threshold (printed to the second).
    assert killed_at - 1 <= shown_time(reason) <= killed_at + client.settings.offline_after_s
    data = await acli_json(procs, "runs", "show", run_id)
    assert data["queue"]["reasons"]["m1"] == "AttendedUserSessionNotActive"
    events = [e for e in data["timeline"] if e["event"] == "waiting"]
    assert events[-1]["detail"]["reasons"]["m2"] == reason
    text = (await acli(procs, "queue", "show")).stdout
    assert "MachineOffline since" in text and "AttendedUserSessionNotActive" in text


def shown_time(reason: str) -> float:
    stamp = reason.removeprefix("MachineOffline since ")
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
