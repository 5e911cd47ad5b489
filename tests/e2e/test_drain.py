"""A graceful stop (SIGTERM, as Kubernetes, systemd and a Windows service stop send it): a
dispatcher under load and a worker with a flow running exit within their grace, and nothing
is lost or run twice."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.errors import NotFound
from dispatcher.models import RunStatus
from dispatcher.settings import Settings
from tests.e2e.test_run_path import group_fleet
from tests.support.constants import OWNER
from tests.support.e2e import in_status, online
from tests.support.processes import Processes
from tests.support.slack import bound

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# Exit within the grace, with what a process needs to start and close its connections.
MARGIN_S = bound(5.0)  # scaled by RUNDISPATCH_TEST_SLACK (tests/support/slack.py)


async def wait_exit(procs: Processes, name: str, within_s: float) -> tuple[int, float]:
    """SIGTERM ``name``; its exit code and how long it took to exit."""
    proc = procs.procs[name]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:
        if time.monotonic() - started > within_s:
            pytest.fail(f"{name} did not exit within {within_s:g} s:\n{procs.log_text(name)}")
        await asyncio.sleep(0.05)
    return proc.returncode, time.monotonic() - started


async def submit(client: Client, duration_s: float) -> str:
    return await client.submit(
        connection_id="c1",
        flow_id="invoice",
        requested_by=OWNER,
        mode="unattended",
        inputs={"duration_s": duration_s},
    )


async def test_sigterm_drains_a_dispatcher_under_load_nothing_lost_or_run_twice(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(group_fleet(2))
    procs.dispatcher("d1")
    for machine in ("m1", "m2"):
        procs.worker(machine)
    await online(client, "m1", "m2")
    first = [await submit(client, 0.01) for _ in range(150)]
    # Under load: runs are being admitted, placed and finished when the signal arrives.
    await in_status(client, first[20], RunStatus.succeeded, timeout=60)
    code, took = await wait_exit(procs, "d1", settings.drain_s + MARGIN_S)
    assert code == 0, procs.log_text("d1")
    assert "drained" in procs.log_text("d1")
    # It stopped under load: work was left for the next dispatcher.
    left = 0
    for run_id in first:
        try:
            left += not (await client.get(run_id)).status.terminal
        except NotFound:  # not even recorded yet
            left += 1
    assert left > 0, "every run had finished: the dispatcher was not stopped under load"
    # Requests keep arriving while no dispatcher runs; a new one takes everything over.
    second = [await submit(client, 0.01) for _ in range(50)]
    procs.dispatcher("d2")
    run_ids = first + second
    runs = await asyncio.gather(*(client.wait(r, timeout=120) for r in run_ids))
    assert Counter(r.status for r in runs) == {RunStatus.succeeded: len(run_ids)}, [
        (r.run_id, r.status, r.error) for r in runs if r.status is not RunStatus.succeeded
    ]
    executions = Counter(e["run_id"] for e in procs.executions())
    assert set(executions) == set(run_ids)
    assert max(executions.values()) == 1, [r for r, n in executions.items() if n > 1]
    assert took < settings.drain_s + MARGIN_S


async def test_sigterm_lets_a_running_flow_finish_within_the_worker_grace(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(group_fleet(1))
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1")
    run_id = await submit(client, settings.worker_grace_s / 3)
    await in_status(client, run_id, RunStatus.running, timeout=30)
    code, _took = await wait_exit(procs, "worker-m1", settings.worker_grace_s + MARGIN_S)
    assert code == 0, procs.log_text("worker-m1")
    run = await client.wait(run_id, timeout=10)
    assert run.status is RunStatus.succeeded, run
    assert [e["run_id"] for e in procs.executions()] == [run_id]


async def test_a_flow_outlasting_the_worker_grace_is_stopped_with_worker_stopped(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    document = group_fleet(1)
    document["machines"][0]["max_unattended_runs"] = 1
    apply_fleet(document)
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1")
    run_id = await submit(client, 120)
    queued = await submit(client, 0.01)  # waits behind: the worker takes nothing new
    await in_status(client, run_id, RunStatus.running, timeout=30)
    code, took = await wait_exit(procs, "worker-m1", settings.worker_grace_s + MARGIN_S)
    assert code == 0, procs.log_text("worker-m1")
    assert took >= settings.worker_grace_s
    run = await client.wait(run_id, timeout=10)
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code.value == "WorkerStopped", run.error
    # The run behind it was not taken by the stopping worker; a new worker runs it once.
    assert (await client.get(queued)).status in (RunStatus.queued, RunStatus.dispatched)
    procs.worker("m1", name="worker-m1-again")
    assert (await client.wait(queued, timeout=60)).status is RunStatus.succeeded
    assert Counter(e["run_id"] for e in procs.executions()) == {run_id: 1, queued: 1}
