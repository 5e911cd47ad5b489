"""One live worker per machine: a second worker started for a machine that a worker serves
refuses to start (exit code 4, one line saying why) and touches nothing of the first one's
runs; once the first worker is gone, a replacement starts."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from dispatcher.adapters.amqp.identities import BrokerIdentities, vhost_of
from dispatcher.client import Client
from dispatcher.core.principals import machine_principal
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.e2e.test_run_path import group_fleet
from tests.support.constants import OWNER
from tests.support.e2e import in_status, online
from tests.support.processes import Processes, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

GATED_FLOW = f"{sys.executable} {Path(__file__).with_name('gated_flow.py')}"
LEASE_HELD = 4


async def submit(client: Client, inputs: dict[str, Any]) -> str:
    return await client.submit(
        connection_id="c1", flow_id="invoice", requested_by=OWNER, mode="unattended", inputs=inputs
    )


async def test_a_second_worker_for_a_machine_refuses_to_start_and_the_first_keeps_its_run(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any, tmp_path: Path
) -> None:
    apply_fleet(group_fleet(1))
    procs.dispatcher()
    gated = ["--command", GATED_FLOW]
    procs.worker("m1", executor="command", extra=gated, name="a")
    await online(client, "m1")
    release = tmp_path / "release"
    run_id = await submit(client, {"release_file": str(release)})
    await in_status(client, run_id, RunStatus.running, timeout=30)

    second = procs.worker("m1", executor="command", extra=gated, name="b")
    await eventually(lambda: second.poll() is not None, timeout=60)
    assert second.returncode == LEASE_HELD, procs.log_text("b")
    errors = [line for line in procs.log_text("b").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another worker already serves machine m1" in errors[0]
    assert "Traceback" not in procs.log_text("b")

    # The first worker keeps its run: it is still running, and ends once, succeeded.
    assert (await client.get(run_id)).status is RunStatus.running
    release.touch()
    finished = await client.wait(run_id, timeout=30)
    assert finished.status is RunStatus.succeeded, finished
    assert procs.alive("a")

    # The first worker dies: RabbitMQ frees its lease, and a replacement serves the machine.
    procs.kill("a")
    procs.worker("m1", executor="command", extra=gated, name="c")
    await eventually(lambda: "serving machine m1" in procs.log_text("c"), timeout=60)
    after = await submit(client, {})
    assert (await client.wait(after, timeout=30)).status is RunStatus.succeeded
    assert procs.alive("c")
    executions = Counter(e["run_id"] for e in procs.executions())
    assert executions == {run_id: 1, after: 1}


async def test_a_machine_identity_without_the_lease_permission_is_told_to_register_again(
    settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    """An identity created before machines could declare their lease (configure nothing):
    the worker stops at once with exit code 2 and says what to do, instead of retrying."""
    apply_fleet(group_fleet(1))
    url = procs.identity("m1")
    names = Names(settings.namespace)
    older = machine_principal(names, "m1")
    older = replace(older, permissions=replace(older.permissions, configure="^$"))
    password = unquote(urlsplit(url).password or "")
    async with BrokerIdentities(
        settings.broker_admin_url.get_secret_value(), vhost_of(settings.amqp_url.get_secret_value())
    ) as identities:
        await identities.put(older, password)
    worker = procs.worker("m1", name="old")
    await eventually(lambda: worker.poll() is not None, timeout=60)
    assert worker.returncode == 2, procs.log_text("old")
    errors = [line for line in procs.log_text("old").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "register the machine again" in errors[0], errors
    assert "Traceback" not in procs.log_text("old")
