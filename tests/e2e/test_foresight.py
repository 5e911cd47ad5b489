"""Foresight end to end: predicted starts, fail-early and the capacity replay, with the
dispatcher and a worker as processes on the real RabbitMQ and Redis.

One machine with two unattended slots serves group ``g:finance``; two credentials connections
(two Windows accounts: one account runs one flow at a time on a machine) take turns, so both
slots are used. The worker's simulate executor runs each flow for the ``duration_s`` of its
inputs. Flows ``f1``, ``f2``, ``f3`` take 1, 2 and 3 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import Run, RunStatus
from dispatcher.settings import Settings
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import acli, acli_json, cli, cli_json, in_status, online
from tests.support.processes import Processes, eventually
from tests.support.slack import bound

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TARGET = "g:finance"
FLOWS = {"f1": 1.0, "f2": 2.0, "f3": 3.0}
CONNECTIONS = ("c1", "c2")


def one_machine_two_slots() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "finance", "name": "Finance bots"}],
        machines=[
            {
                "machine_id": "m1",
                "name": "FIN-01",
                "group_id": "finance",
                "os": "windows_server",
                "max_unattended_runs": 2,
            }
        ],
        connections=[
            {
                "connection_id": connection,
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "finance"},
                "username": f"CONTOSO\\svc-{connection}",
                "password": "s3cret-pw",
            }
            for connection in CONNECTIONS
        ],
    )


async def start(procs: Processes, apply_fleet: Any) -> None:
    apply_fleet(one_machine_two_slots())
    procs.dispatcher()
    procs.worker("m1")


async def run_flow(client: Client, flow: str, seconds: float, index: int = 0, **extra: Any) -> str:
    """Submit a run of ``flow``; ``index`` picks the connection (they take turns)."""
    return await client.submit(
        connection_id=CONNECTIONS[index % 2], flow_id=flow, requested_by=OWNER, mode="unattended",
        inputs={"duration_s": seconds}, **extra,
    )  # fmt: skip


async def finish_all(client: Client, run_ids: list[str], timeout: float = 120) -> list[Run]:
    return list(await asyncio.gather(*(client.wait(r, timeout=timeout) for r in run_ids)))


async def history(client: Client, per_flow: int) -> list[Run]:
    """Runs of each flow, finished: the target's recent service."""
    pairs = [(flow, seconds) for _ in range(per_flow) for flow, seconds in FLOWS.items()]
    ids = [await run_flow(client, flow, seconds, i) for i, (flow, seconds) in enumerate(pairs)]
    runs = await finish_all(client, ids)
    assert {run.status for run in runs} == {RunStatus.succeeded}
    return runs


async def test_predicted_starts_beat_position_times_mean_over_slots(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start(procs, apply_fleet)
    warm = await history(client, per_flow=4)
    mean_slot = statistics.fmean((run.finished_at or 0) - (run.dispatched_at or 0) for run in warm)
    # Occupy both slots, then enqueue 30 runs of 1-3 s at once.
    holders = [await run_flow(client, "f3", 3.0, i) for i in range(2)]
    for run_id in holders:
        await in_status(client, run_id, RunStatus.running)
    flows = [f"f{1 + (i * 7) % 3}" for i in range(30)]
    run_ids = [await run_flow(client, flow, FLOWS[flow], i) for i, flow in enumerate(flows)]
    predicted: dict[str, tuple[float, float, int]] = {}  # run -> (seen at, predicted, position)

    async def all_predicted() -> bool:
        seen_at = time.time()
        for entry in await client.queue(TARGET, limit=100):
            if entry.run_id in run_ids and entry.run_id not in predicted:
                assert entry.outlook == "starts", entry
                assert entry.predicted_start_at is not None
                predicted[entry.run_id] = (seen_at, entry.predicted_start_at, entry.position)
        return len(predicted) == len(run_ids)

    await eventually(all_predicted, timeout=10, interval=0.02)
    runs = {run.run_id: run for run in await finish_all(client, run_ids + holders)}
    errors, naive_errors, waits = [], [], []
    for run_id in run_ids:
        run = runs[run_id]
        assert run.status is RunStatus.succeeded and run.started_at is not None
        seen_at, start_at, position = predicted[run_id]
        waits.append(run.started_at - (run.queued_at or seen_at))
        errors.append(abs(start_at - run.started_at))
        naive = seen_at + position * mean_slot / 2
        naive_errors.append(abs(naive - run.started_at))
    median_error = statistics.median(errors)
    median_naive = statistics.median(naive_errors)
    median_wait = statistics.median(waits)
    print(
        f"\npredicted start: median abs error {median_error:.2f} s; naive (position x mean "
        f"{mean_slot:.2f} s / 2 slots): {median_naive:.2f} s; median actual wait "
        f"{median_wait:.2f} s ({median_error / median_wait:.1%} of it)"
    )
    assert median_error < 0.25 * median_wait
    assert median_error < median_naive


async def test_fail_early_ends_a_run_that_cannot_make_its_deadline(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start(procs, apply_fleet)
    # No history yet: the same situation never ends a run early (it waits for its deadline).
    first = [await run_flow(client, "slow", 5.0, i) for i in range(2)]
    await in_status(client, first[0], RunStatus.running)
    await in_status(client, first[1], RunStatus.running)
    unsure = await run_flow(client, "slow", 5.0, 0, queue_timeout_s=2, fail_early=True)
    waited = await client.wait(unsure, timeout=20)
    assert waited.error is not None and waited.error.code.value == "NoCandidateMachine"
    await finish_all(client, first)
    # History: 24 runs of the kind (the rule needs 20 effective samples), 4 of them of "slow".
    quick = [await run_flow(client, "quick", 0.1, i) for i in range(20)]
    slow = [await run_flow(client, "slow", 5.0, i) for i in range(4)]
    await finish_all(client, quick + slow)
    # Two slow runs hold both slots, two more wait: a slow run with 4 s left cannot make it.
    ahead = [await run_flow(client, "slow", 5.0, i) for i in range(4)]
    await in_status(client, ahead[0], RunStatus.running)
    await in_status(client, ahead[1], RunStatus.running)
    eager = await run_flow(client, "slow", 5.0, 0, queue_timeout_s=4, fail_early=True)
    patient = await run_flow(client, "slow", 5.0, 0, queue_timeout_s=4)
    ended = await client.wait(eager, timeout=10)
    assert ended.status is RunStatus.timed_out
    assert ended.error is not None and ended.error.code.value == "PredictedQueueTimeout"
    assert ended.queued_at is not None and ended.finished_at is not None
    print(f"\nfail_early: ended {ended.finished_at - ended.queued_at:.2f} s after admission")
    assert ended.finished_at - ended.queued_at < bound(2.0)  # RUNDISPATCH_TEST_SLACK
    waited = await client.wait(patient, timeout=20)
    assert waited.status is RunStatus.timed_out
    assert waited.error is not None and waited.error.code.value == "NoCandidateMachine"
    assert waited.finished_at is not None and waited.queued_at is not None
    assert waited.finished_at - waited.queued_at >= 4.0
    await finish_all(client, ahead)


async def test_capacity_replays_the_recorded_window(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    await start(procs, apply_fleet)
    since = time.time() - 1
    # 12 runs of 2 s at once on 2 slots with a 7 s queue limit: the last ones time out.
    run_ids = [await run_flow(client, "f2", 2.0, i, queue_timeout_s=7) for i in range(12)]
    runs = await finish_all(client, run_ids, timeout=60)
    recorded_timeouts = sum(run.status is RunStatus.timed_out for run in runs)
    assert recorded_timeouts >= 2

    async def traced() -> bool:  # every run's terminal event has reached the trace
        report = await client.capacity(TARGET, add_machines=0, since=since)
        return report.recorded.runs == len(run_ids)

    await eventually(traced, timeout=10, interval=0.2)
    report = cli_json(
        procs, "capacity", "--target", TARGET, "--add-machines", "1", f"--since={since}", "--json"
    )
    recorded, today, changed = report["recorded"], report["today"], report["changed"]
    print(f"\ncapacity: recorded {recorded}\n  today {today}\n  +1 machine {changed}")
    assert recorded["timed_out"] == recorded_timeouts
    assert recorded["p50_wait_s"] > 0
    assert abs(today["p50_wait_s"] - recorded["p50_wait_s"]) <= 0.2 * recorded["p50_wait_s"]
    assert changed["machines"] == 2
    assert changed["timed_out"] < recorded["timed_out"]
    # The eligibility trace: the worker's first heartbeat, then maintenance from the CLI.
    cli(procs, "machines", "maintenance", "m1", "on")
    changes = await client.rt.traces.changes()
    assert changes[0].machine_id == "m1" and changes[0].online and not changes[0].maintenance
    assert changes[-1].maintenance and changes[-1].at >= changes[0].at
    # Bad targets: a clear error, no traceback.
    for target, added in (("g:nope", "0"), ("m:m1", "1"), ("finance", "0")):
        result = cli(procs, "capacity", "--target", target, "--add-machines", added, check=False)
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


async def test_runs_show_and_queue_show_give_the_forecast(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    await start(procs, apply_fleet)
    await online(client, "m1", procs=procs)
    holders = [await run_flow(client, "hold", 60.0, i) for i in range(2)]
    for run_id in holders:
        await in_status(client, run_id, RunStatus.running)
    behind = await run_flow(client, "f1", 1.0)
    # Attended, and nobody is logged in on the machine: no machine can take it.
    stranded = await client.submit(
        connection_id="c2", flow_id="f1", requested_by=OWNER, mode="attended"
    )
    await in_status(client, behind, RunStatus.queued)
    await in_status(client, stranded, RunStatus.queued)

    shown = await acli_json(procs, "runs", "show", behind)
    assert shown["outlook"] == "starts" and shown["confidence"] in {"high", "medium", "low"}
    start_at = datetime.fromisoformat(shown["predicted_start_at"].replace("Z", "+00:00"))
    assert start_at.timestamp() > time.time()  # it waits for a 60 s run (prior: low confidence)
    assert shown["queue"]["predicted_start_at"] == shown["predicted_start_at"]
    text = (await acli(procs, "runs", "show", stranded)).stdout
    assert "forecast   no machine can take it" in text
    assert "AttendedUserNotLoggedIn" in text
    shown = await acli_json(procs, "runs", "show", stranded)
    assert shown["outlook"] == "no_machine" and shown["predicted_start_at"] is None
    assert shown["queue"]["no_machine_reasons"] == {"m1": "AttendedUserNotLoggedIn"}

    listed = {e["run_id"]: e for e in await acli_json(procs, "queue", "show", "--target", TARGET)}
    assert listed[behind]["outlook"] == "starts" and listed[behind]["predicted_start_at"]
    assert listed[stranded]["outlook"] == "no_machine"
    table = (await acli(procs, "queue", "show", "--target", TARGET)).stdout
    assert "no machine can take it" in table and "starts ~" in table
    prediction = await client.predict(behind)
    assert prediction is not None and prediction.start_at == pytest.approx(
        start_at.timestamp(), abs=5
    )
    for run_id in (*holders, behind, stranded):
        await client.cancel(run_id)
