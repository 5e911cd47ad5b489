"""Redis restarted (or failed over) having lost the claim and the start of a running run: the
run is back in its queue while its flow runs on a machine, and another machine is free. The
dispatcher must not place it there before the running machine has reported it: placement
waits, after a new Redis server answers, until every online machine has heartbeated, and the
report repairs the lost claim (``adopt.lua``). The run runs once, on its machine, under its
fence; the witness is the flow's own file, not the product's ledger.

Real processes: one dispatcher, two workers, a private redis-server with AOF that the test
SIGKILLs and restarts (a new server for the dispatcher), then rewrites as if the claim had been
lost with the last writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.chaos.test_lost_writes import lose_claim_and_start
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import acli, in_status
from tests.support.privateredis import PrivateRedis
from tests.support.processes import Processes, eventually, new_settings
from tests.support.slack import bound
from tests.support.witness import WitnessFlow

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

MACHINES = ("m1", "m2")


@pytest.fixture
def settings(private_redis: PrivateRedis) -> Settings:
    return new_settings(
        redis_url=private_redis.url,
        heartbeat_interval_s=0.5,
        # Long enough that the Redis restart does not declare the machines lost.
        offline_after_s=bound(6.0),
        outage_hold_s=2.0,
    )


def fleet() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "bots", "name": "Bots"}],
        machines=[
            {"machine_id": m, "name": m.upper(), "group_id": "bots", "max_unattended_runs": 2}
            for m in MACHINES
        ],
        # Two accounts: an unattended run holds a session of its account on its machine.
        connections=[
            {
                "connection_id": connection_id,
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "bots"},
                "username": f"CONTOSO\\svc-{connection_id}",
                "password": "pw",
            }
            for connection_id in ("c1", "c2")
        ],
    )


async def test_after_a_restart_that_lost_a_claim_the_run_is_not_placed_again(
    client: Client,
    settings: Settings,
    procs: Processes,
    apply_fleet: Any,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    apply_fleet(fleet())
    witness = WitnessFlow(tmp_path)
    for machine_id in MACHINES:
        witness.hold(machine_id)  # a long flow waits at its start until released
        procs.worker(machine_id, executor="command", extra=witness.worker_args(machine_id))
    procs.dispatcher()
    names = Names(settings.namespace)
    # Both long runs on m1 (m2 in maintenance meanwhile): after the lost claim m1 still runs
    # the other one, so m2 is the least loaded machine, where a pass would place the lost run.
    await acli(procs, "machines", "maintenance", "m2", "on")
    run_id, other = [
        await client.submit(
            connection_id=connection_id,
            flow_id="f",
            requested_by=OWNER,
            mode="unattended",
            inputs={"duration_s": 1},
        )
        for connection_id in ("c1", "c2")
    ]
    running = await in_status(client, run_id, RunStatus.running, timeout=bound(30))
    await in_status(client, other, RunStatus.running, timeout=bound(30))
    assert running.fence is not None and running.machine_id == "m1"
    runs_on = "m1"
    await acli(procs, "machines", "maintenance", "m2", "off")
    await eventually(
        lambda: sorted(w.run_id for w in witness.read()[0]) == sorted([run_id, other]),
        timeout=10,
    )

    # Redis dies and comes back without the claim (and the fence counter's increment): the run
    # is queued, and the other machine has a free slot.
    private_redis.kill()
    private_redis.start()
    await lose_claim_and_start(
        client, names, run_id, running.fence, rollback=True, machine_id=runs_on
    )
    # Another request asks for a pass over the target at once: the lost run is the head of
    # its lane, and the other machine is free.
    after = await client.submit(
        connection_id="c1", flow_id="f", requested_by=OWNER, mode="unattended", inputs={}
    )

    # The running machine's report repairs the claim; nothing else runs it meanwhile.
    async def adopted() -> bool:
        run = await client.rt.runs.get(run_id)
        return (
            run is not None
            and run.status is RunStatus.running
            and (run.machine_id, run.fence) == (runs_on, running.fence)
        )

    await eventually(adopted, timeout=bound(30))
    for machine_id in MACHINES:
        witness.release(machine_id)
    final = await client.wait(run_id, timeout=bound(30))
    assert final.status is RunStatus.succeeded, final.error
    assert (final.machine_id, final.fence) == (runs_on, running.fence)
    # Placement goes on afterwards: the other request is placed and runs.
    assert (await client.wait(after, timeout=bound(30))).status is RunStatus.succeeded
    seen, unparsed = witness.read()
    assert not unparsed
    executions = [(w.machine, w.fence) for w in seen if w.run_id == run_id]
    assert executions == [(runs_on, running.fence)]
    assert [w.run_id for w in seen].count(after) == 1
    assert (await client.wait(other, timeout=bound(30))).status is RunStatus.succeeded
