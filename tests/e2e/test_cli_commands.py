"""The CLI's everyday commands on the real services: ``submit`` (with inputs, ``--wait``),
``runs wait``, ``machines list`` and ``redrive --dry-run``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.usecases.redrive import redriven_id
from tests.support.builders import credentials, fleet_document, machine
from tests.support.constants import OWNER
from tests.support.e2e import acli, acli_json, online
from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SUBMIT = ("submit", "--connection", "c1", "--flow", "flow-7", "--requested-by", OWNER)


def fleet() -> dict[str, Any]:
    return fleet_document(
        machines=[machine("m1", slots=2)],
        connections=[credentials("c1", machine_id="m1", username="CONTOSO\\svc")],
    )


async def test_submit_wait_machines_list_and_a_dry_run_redrive(
    client: Client, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(fleet())
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1", procs=procs)

    listed = await acli_json(procs, "machines", "list")
    assert [(m["machine_id"], m["online"], m["maintenance"]) for m in listed] == [
        ("m1", True, False)
    ]
    assert listed[0]["max_unattended_runs"] == 2 and listed[0]["runs"] == 0

    # submit: inputs parsed as JSON when they can be, a run id printed; runs wait: the record.
    submitted = await acli_json(
        procs, *SUBMIT, "--mode", "unattended", "--input", "duration_s=0", "--input", "note=hi"
    )
    run_id = submitted["run_id"]
    waited = await acli_json(procs, "runs", "wait", run_id, "--timeout", "60")
    assert waited["run_id"] == run_id and waited["status"] == "succeeded"
    assert waited["inputs"] == {"duration_s": 0, "note": "hi"}
    assert waited["flow_id"] == "flow-7" and waited["machine_id"] == "m1"

    # submit --wait: the exit code says how the run ended.
    failing = await acli(
        procs,
        *SUBMIT,
        "--mode", "unattended", "--input", "outcome=failed", "--input", "duration_s=0",
        "--run-id", f"{run_id}-f", "--wait", "--timeout", "60", "--json",
        check=False,
    )  # fmt: skip
    assert failing.returncode == 1, failing.stderr
    failed = json.loads(failing.stdout)
    assert failed["status"] == "failed" and failed["error"]["code"] == "FlowFailed"
    bad = await acli(procs, *SUBMIT, "--mode", "unattended", "--input", "novalue", check=False)
    assert bad.returncode != 0 and "--input expects KEY=VALUE" in bad.stderr

    # redrive --dry-run names what it would re-submit and submits nothing.
    dry = await acli_json(procs, "redrive", "--status", "failed", "--since", "-1h", "--dry-run")
    assert dry == {"submitted": [[f"{run_id}-f", redriven_id(f"{run_id}-f")]], "skipped": []}
    # A marker submitted after it is recorded after anything the dry run might have sent.
    marker = await acli_json(procs, *SUBMIT, "--mode", "unattended", "--input", "duration_s=0")
    assert (await client.wait(marker["run_id"], timeout=60)).status is RunStatus.succeeded
    assert await client.rt.runs.get(redriven_id(f"{run_id}-f")) is None
    # The real one does submit it, once.
    real = await acli_json(procs, "redrive", "--status", "failed", "--since", "-1h")
    assert real["submitted"] == dry["submitted"]
    redriven = await client.wait(redriven_id(f"{run_id}-f"), timeout=60)
    assert redriven.status is RunStatus.failed and redriven.inputs == failed["inputs"]
    again = await acli_json(procs, "redrive", "--status", "failed", "--since", "-1h")
    # The original is not re-driven twice (the re-drive, failed too, is a run of its own).
    assert again["skipped"] == [[f"{run_id}-f", "already re-driven"]]
    assert [old for old, _ in again["submitted"]] == [redriven.run_id]

    await acli(procs, "machines", "maintenance", "m1", "on")
    listed = await acli_json(procs, "machines", "list")
    assert listed[0]["maintenance"] is True
