"""Helpers of the end-to-end tests: runs in a status, why a run waits, the CLI, machines online."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from dispatcher.client import Client
from dispatcher.errors import NotFound
from dispatcher.models import Run, RunStatus
from tests.support.constants import OWNER
from tests.support.processes import (
    REPO,
    Processes,
    eventually,
)

# Long enough to hold a slot for the whole test; such runs are always cancelled.
HOLD_S = 120


async def submit(client: Client, connection_id: str, mode: str, **extra: Any) -> str:
    return await client.submit(
        connection_id=connection_id, flow_id="flow", requested_by=OWNER, mode=mode, **extra
    )


async def submit_runs(client: Client, count: int, duration_s: float = 0.05) -> list[str]:
    """``count`` unattended runs of connection ``c1`` for OWNER, simulated ``duration_s`` each."""
    return [
        await client.submit(
            connection_id="c1",
            flow_id="invoice",
            requested_by=OWNER,
            mode="unattended",
            inputs={"duration_s": duration_s},
        )
        for _ in range(count)
    ]


async def recorded(client: Client, run_id: str, timeout: float = 15.0) -> Run:
    """The run's record, once the dispatcher has recorded it."""

    async def get() -> Run | None:
        try:
            return await client.get(run_id)
        except NotFound:
            return None

    run: Run = await eventually(get, timeout=timeout)
    return run


async def in_status(client: Client, run_id: str, *statuses: RunStatus, timeout: float = 15) -> Run:
    async def check() -> Run | None:
        try:
            run = await client.get(run_id)
        except NotFound:
            return None
        return run if run.status in statuses else None

    run: Run = await eventually(check, timeout=timeout)
    return run


async def waiting_because(
    client: Client, run_id: str, expected: dict[str, str], timeout: float = 15
) -> Run:
    """Wait until the queued run's per-machine reasons are exactly ``expected``."""
    seen: list[Any] = []

    async def check() -> Run | None:
        try:
            run = await client.get(run_id)
        except NotFound:
            return None
        entry = await client.explain(run)
        seen[:] = [run.status, entry.reasons if entry else None]
        return run if entry is not None and entry.reasons == expected else None

    try:
        run: Run = await eventually(check, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"run {run_id} never waited for {expected}; last seen {seen}") from exc
    return run


def cli(procs: Processes, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dispatcher ARGS`` with the test's settings."""
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=REPO,
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def cli_json(procs: Processes, *args: str) -> Any:
    return json.loads(cli(procs, *args, "--json").stdout)


async def acli(
    procs: Processes, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``cli`` without blocking the event loop."""
    return await asyncio.to_thread(cli, procs, *args, check=check)


async def acli_json(procs: Processes, *args: str) -> Any:
    return await asyncio.to_thread(cli_json, procs, *args)


async def online(
    client: Client, *machine_ids: str, procs: Processes | None = None, timeout: float = 15
) -> None:
    """Wait until the dispatcher has recorded a heartbeat (with a key) of every machine."""

    async def check() -> bool:
        fleet = await client.rt.fleet.load(force=True)
        machines = [fleet.machines[m] for m in machine_ids]
        views = await client.rt.machines.views(
            machines, time.time(), client.settings.offline_after_s
        )
        return all(v.online and v.has_public_key for v in views)

    try:
        await eventually(check, timeout=timeout)
    except AssertionError as exc:
        logs = ""
        if procs is not None:
            logs = "\n".join(f"--- {n}\n{procs.log_text(n)[-3000:]}" for n in procs.logs)
        raise AssertionError(
            f"machines {machine_ids} not online within {timeout} s\n{logs}"
        ) from exc


def events(run: Run) -> list[str]:
    return [e.event for e in run.timeline]
