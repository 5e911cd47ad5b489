"""Cancellation and re-drive end to end, through the real CLI, AMQP and processes.

* ``python -m dispatcher cancel RUN_ID`` on a queued run: ``cancelled``, out of the queue,
  never executed; on a running run: the worker stops the flow, ``cancelled`` within seconds,
  started exactly once.
* A cancel published to ``<ns>.requests`` with routing key ``cancel`` does the same.
* ``python -m dispatcher redrive --status timed_out --since -1h`` re-submits the runs that
  timed out, keeping priority and order; they run; a second re-drive submits nothing new.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aio_pika
import pytest

from dispatcher.client import Client
from dispatcher.core.principals import admin_user_of
from dispatcher.models import Run, RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import OWNER
from tests.support.processes import (
    REPO,
    Processes,
    eventually,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def machine_fleet(slots: int = 2) -> dict[str, Any]:
    """One machine ``m1``; connections ``c1`` and ``c2`` (different Windows users, so that
    both can run unattended on it at once) targeting it."""
    return fleet_document(
        machines=[
            {
                "machine_id": "m1",
                "name": "DESK-01",
                "os": "windows_server",
                "max_unattended_runs": slots,
            }
        ],
        connections=[
            {
                "connection_id": connection_id,
                "owner": OWNER,
                "kind": "credentials",
                "target": {"machine_id": "m1"},
                "username": f"CONTOSO\\svc-{connection_id}",
                "password": "s3cret-pw",
            }
            for connection_id in ("c1", "c2")
        ],
    )


def cli(procs: Processes, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=REPO,
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


async def submit(
    client: Client, run_id: str | None = None, connection_id: str = "c1", **fields: Any
) -> str:
    inputs = fields.pop("inputs", {"duration_s": 0.05})
    return await client.submit(
        connection_id=connection_id,
        flow_id="flow",
        requested_by=OWNER,
        mode="unattended",
        inputs=inputs,
        run_id=run_id,
        **fields,
    )


async def status_is(client: Client, run_id: str, *statuses: RunStatus) -> Run | None:
    try:
        run = await client.get(run_id)
    except Exception:
        return None
    return run if run.status in statuses else None


def executed(procs: Processes, run_id: str) -> int:
    return sum(1 for e in procs.executions() if e["run_id"] == run_id)


async def publish_cancel(settings: Settings, run_id: str) -> None:
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"run_id": run_id}).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=admin_user_of(settings.amqp_url.get_secret_value()),
            ),
            "cancel",
        )


async def test_cancel_a_queued_run_with_the_cli_and_over_amqp(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(machine_fleet())
    procs.dispatcher()  # no worker yet: m1 was never seen, every run stays queued
    by_cli, by_amqp, kept = (f"q-{name}-{time.time_ns()}" for name in ("cli", "amqp", "kept"))
    for run_id in (by_cli, by_amqp, kept):
        await submit(client, run_id)
    for run_id in (by_cli, by_amqp, kept):
        await eventually(lambda r=run_id: status_is(client, r, RunStatus.queued), timeout=20)
    assert [e.run_id for e in await client.queue("m:m1")] == [by_cli, by_amqp, kept]

    result = cli(procs, "cancel", by_cli)
    assert result.stdout.strip() == f"{by_cli}: cancelled"
    await publish_cancel(settings, by_amqp)
    run = await eventually(lambda: status_is(client, by_amqp, RunStatus.cancelled), timeout=20)
    assert run.error is not None and run.error.code.value == "Cancelled"
    assert [e.run_id for e in await client.queue("m:m1")] == [kept]

    cancelled = await client.get(by_cli)
    assert cancelled.status is RunStatus.cancelled
    assert cancelled.error is not None and cancelled.error.code.value == "Cancelled"
    assert [e.event for e in cancelled.timeline if e.event != "waiting"] == [
        "queued",
        "cancelled",
    ]

    # The machine comes online: only the run nobody cancelled runs.
    procs.worker("m1")
    assert (await client.wait(kept, timeout=30)).status is RunStatus.succeeded
    marker = await submit(client)
    await client.wait(marker, timeout=30)
    assert executed(procs, by_cli) == 0 and executed(procs, by_amqp) == 0
    assert executed(procs, kept) == 1
    for run_id in (by_cli, by_amqp):
        assert (await client.get(run_id)).status is RunStatus.cancelled


async def test_cancel_a_running_run_stops_the_flow(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(machine_fleet())
    procs.dispatcher()
    procs.worker("m1")
    by_cli = await submit(client, inputs={"duration_s": 60})
    by_amqp = await submit(client, connection_id="c2", inputs={"duration_s": 60})
    for run_id in (by_cli, by_amqp):
        await eventually(lambda r=run_id: status_is(client, r, RunStatus.running), timeout=30)

    result = cli(procs, "cancel", by_cli, "--wait", "--timeout", "20")
    assert result.stdout.strip() == f"{by_cli}: cancelled", result.stdout
    run = await client.get(by_cli)
    # The 60 s flow was stopped, not waited for: the run ended long before the flow would have.
    assert run.started_at is not None and run.finished_at is not None
    assert run.finished_at - run.started_at < 60
    assert run.status is RunStatus.cancelled
    assert run.error is not None and run.error.code.value == "Cancelled"
    events = [e.event for e in run.timeline if e.event != "waiting"]
    assert events == ["queued", "dispatched", "started", "cancel_requested", "cancelled"]

    await publish_cancel(settings, by_amqp)
    await eventually(lambda: status_is(client, by_amqp, RunStatus.cancelled), timeout=30)

    # Each flow was started once and stopped: the ledger says so, and the slots are free.
    for run_id in (by_cli, by_amqp):
        assert executed(procs, run_id) == 1

    def stopped() -> dict[str, str]:
        # The worker writes its ledger line once the dispatcher answered its report.
        ledger = (procs.state_dir("m1") / "ledger.jsonl").read_text().splitlines()
        finishes = [json.loads(line) for line in ledger]
        return {e["run_id"]: e.get("status") for e in finishes if e["event"] == "finished"}

    expected = {by_cli: "cancelled", by_amqp: "cancelled"}
    await eventually(lambda: stopped() == expected, timeout=10)
    after = await submit(client)
    assert (await client.wait(after, timeout=30)).status is RunStatus.succeeded


async def test_redrive_resubmits_timed_out_runs_in_order_once(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(machine_fleet(slots=1))
    procs.dispatcher()  # no worker: the runs time out in the queue
    plan = ["normal", "high", "normal", "high", "normal", "high"]
    originals = []
    for index, priority in enumerate(plan):
        run_id = f"late-{index}-{priority}"
        await submit(client, run_id, priority=priority, queue_timeout_s=5)
        originals.append(run_id)
    for run_id in originals:
        await eventually(
            lambda r=run_id: status_is(client, r, RunStatus.timed_out), timeout=30, interval=0.2
        )
    timed_out = [await client.get(r) for r in originals]
    assert {r.error.code.value for r in timed_out if r.error} == {"NoCandidateMachine"}
    # Queue order: high first, then normal, each in arrival order.
    expected = [r for r in originals if r.endswith("high")] + [
        r for r in originals if r.endswith("normal")
    ]

    # The machine comes back, busy with a blocker, so the re-driven runs queue behind it.
    procs.worker("m1")
    blocker = await client.submit(
        connection_id="c1",
        flow_id="blocker",
        requested_by=OWNER,
        mode="unattended",
        inputs={"duration_s": 3},
    )
    await eventually(lambda: status_is(client, blocker, RunStatus.running), timeout=30)

    result = cli(procs, "redrive", "--status", "timed_out", "--since", "-1h", "--json")
    report = json.loads(result.stdout)
    assert report["submitted"] == [[old, f"{old}.r"] for old in expected]
    assert report["skipped"] == []
    redriven = [f"{old}.r" for old in expected]
    for run_id in redriven:
        await eventually(
            lambda r=run_id: status_is(client, r, *RunStatus), timeout=20, interval=0.1
        )
    # What started, then the queue: a run started before the first read has left the queue
    # by the second, so none is in both; one handed to the worker but not yet executing is
    # in neither, and the snapshot is taken again.
    for _ in range(100):
        started = [e["run_id"] for e in procs.executions()]
        queued = [e.run_id for e in await client.queue("m:m1")]
        if all(r in queued or r in started for r in redriven):
            break
        await asyncio.sleep(0.05)
    assert [r for r in redriven if r not in started] == queued, (queued, started)

    runs = await asyncio.gather(*(client.wait(r, timeout=60) for r in redriven))
    assert all(r.status is RunStatus.succeeded for r in runs)
    for new, old in zip(runs, expected, strict=True):
        original = await client.get(old)
        assert new.priority == original.priority and new.inputs == original.inputs
        assert new.queue_timeout_s == original.queue_timeout_s
    order = [e["run_id"] for e in procs.executions() if e["run_id"] in set(redriven)]
    assert order == redriven

    # A second re-drive finds the same timed-out runs and submits nothing new.
    again = json.loads(
        cli(procs, "redrive", "--status", "timed_out", "--since", "-1h", "--json").stdout
    )
    assert again["submitted"] == []
    assert sorted(old for old, _ in again["skipped"]) == sorted(originals)
    marker = await submit(client)
    await client.wait(marker, timeout=30)
    counts = [executed(procs, r) for r in redriven]
    assert counts == [1] * len(redriven)
    assert all(executed(procs, r) == 0 for r in originals)
    for run_id in originals:
        assert (await client.get(run_id)).status is RunStatus.timed_out
