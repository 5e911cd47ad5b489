"""A machine only ever frees its own slots and keeps only its own runs: after lost writes the
same fence can name the run on another machine."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.adapters.redis import codec
from dispatcher.models import RunStatus
from tests.usecases.test_worker import MachineFactory, machines

__all__ = ["machines"]  # the fixture, shared with test_worker

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


async def test_a_flow_whose_run_is_another_machine_s_now_is_dropped(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    await asyncio.sleep(0)  # the flow runs
    stored = m.world.store.runs["r1"]
    assert stored["status"] == '"running"'
    # Claim and start were lost and the run went to m2 under the same fence.
    stored["machine_id"] = codec.fragment("m2")
    await m.worker.heartbeats.drop_abandoned()
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.cancelled
    run = await m.world.run("r1")
    assert run.status is RunStatus.running and run.machine_id == "m2"  # m1 did not end it
