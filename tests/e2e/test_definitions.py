"""The RabbitMQ definitions our code generates from ``names.py``: the committed file is up to
date, they import into the real RabbitMQ (``rabbitmqctl import_definitions``, a scratch
virtual host), their policies apply to the queues (machine queues declared later included),
and a dispatcher and a worker run a flow against them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.adapters.amqp.definitions import (
    DEAD_LETTER_MAX,
    TOPOLOGY_KEYS,
    definitions_document,
    topology_definitions,
)
from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.e2e.test_run_path import group_fleet
from tests.support.constants import OWNER
from tests.support.e2e import online
from tests.support.processes import REPO, Processes, new_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

COMMITTED = REPO / "deploy" / "rabbitmq" / "definitions.json"


def rabbitmqctl(*args: str, check: bool = True) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed here")
    result = subprocess.run(
        ["rabbitmqctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 or not check, result.stderr
    return result.stdout


def test_the_committed_definitions_are_generated_from_the_code() -> None:
    committed = json.loads(COMMITTED.read_text())
    expected = topology_definitions(Names("rundispatch"), "/")
    stale = [key for key in TOPOLOGY_KEYS if committed.get(key) != expected[key]]
    assert not stale, (
        f"{COMMITTED} is out of date in {stale}: run "
        "`python -m dispatcher definitions --output deploy/rabbitmq/definitions.json`"
    )


@pytest.fixture
def vhost(tmp_path: Path) -> Iterator[str]:
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    yield name
    rabbitmqctl("delete_vhost", name, check=False)


@pytest.fixture(params=["generated", "operators-own"])
def settings(vhost: str, request: pytest.FixtureRequest) -> Settings:
    settings = new_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
    document = definitions_document(Names(settings.namespace), vhost)
    if request.param == "operators-own":
        # An operator's own definitions: the requests queue is quorum and leaves the delivery
        # limit and dead-lettering to the policy. The processes use it as it is.
        document["queues"][0]["arguments"] = {"x-queue-type": "quorum"}
    document["permissions"] = [
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    ]
    # The CLI may run as the broker's user, which cannot read pytest's private directory.
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(document, handle)
    try:
        os.chmod(handle.name, 0o644)
        rabbitmqctl("import_definitions", handle.name)
    finally:
        os.unlink(handle.name)
    return settings


def listing(*args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(rabbitmqctl(*args, "--formatter", "json", "-q"))
    return rows


async def test_definitions_import_and_a_dispatcher_runs_against_them(
    settings: Settings, vhost: str, client: Client, procs: Processes, apply_fleet: Any
) -> None:
    names = Names(settings.namespace)
    policies = {p["name"]: p for p in listing("list_policies", "-p", vhost)}
    assert set(policies) == {f"{names.ns}.work", f"{names.ns}.dead"}
    dead_policy = policies[f"{names.ns}.dead"]["definition"]
    dead_policy = json.loads(dead_policy) if isinstance(dead_policy, str) else dead_policy
    assert dead_policy["max-length"] == DEAD_LETTER_MAX
    apply_fleet(group_fleet(1))
    procs.dispatcher()
    procs.worker("m1")
    await online(client, "m1", procs=procs)
    run_id = await client.submit(
        connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended"
    )
    run = await client.wait(run_id, timeout=60)
    assert run.status is RunStatus.succeeded, run
    queues = {q["name"]: q for q in listing("list_queues", "-p", vhost, "name", "type", "policy")}
    assert queues[names.requests_queue]["type"] == "quorum"
    assert queues[names.requests_queue]["policy"] == f"{names.ns}.work"
    # A machine queue declared by the processes later is covered by the same policy.
    assert queues[names.machine_queue("m1")]["policy"] == f"{names.ns}.work"
    # A replies queue is not work: an expired answer is not dead-lettered.
    assert not queues[names.machine_replies_queue("m1")]["policy"]
    assert queues[names.dead_queue]["policy"] == f"{names.ns}.dead"
    # The processes found the topology and used it as it is: nothing was re-created.
    [requests] = [
        q
        for q in listing("list_queues", "-p", vhost, "name", "arguments")
        if q["name"] == names.requests_queue
    ]
    operators_own = "x-delivery-limit" not in json.dumps(requests["arguments"])
    warned = "exists with other arguments" in procs.log_text("dispatcher")
    assert warned == operators_own
