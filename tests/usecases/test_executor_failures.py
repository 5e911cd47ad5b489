"""An executor that raises, whatever it raises, ends the run ``failed`` with a code at once
(not at its time limit + grace); a request asking for a run time limit above the cap is
rejected at admission."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.core.admission import Rejection, admit
from dispatcher.models import RunStatus
from tests.support.builders import credentials, fleet, machine, request, request_payload
from tests.support.fakes import FakeDelivery
from tests.support.world import World
from tests.usecases.test_worker import MachineFactory, machines
from workers.executors import CommandExecutor, FlowContext, FlowResult

__all__ = ["machines"]  # the fixture, shared with test_worker

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Raising:
    """An executor with a bug."""

    async def run(self, context: FlowContext) -> FlowResult:
        raise RuntimeError(f"boom with {context.secret}")


async def test_an_executor_that_raises_ends_the_run_failed_at_once(
    machines: MachineFactory,
) -> None:
    m = machines(Raising())
    delivery = await m.dispatch("r1")
    await m.worker.intake.handle([delivery])
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.failed
    assert executed.code is ErrorCode.ExecutorFailed
    assert m.metrics.named("executor_error") == [("crashed",)]
    run = await m.world.run("r1")
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code is ErrorCode.ExecutorFailed
    assert "boom" not in run.error.message  # the exception's text may hold the secret


async def test_a_nul_byte_in_the_flow_id_ends_the_run_failed(
    machines: MachineFactory, tmp_path: Path
) -> None:
    m = machines(CommandExecutor({}, [sys.executable, "-c", "print('{}')"]))
    delivery = await m.dispatch("r1")
    assignment = json.loads(delivery.body)
    assignment["request"]["flow_id"] = "flow\x00one"
    await m.worker.intake.handle([FakeDelivery(json.dumps(assignment).encode(), type="assign")])
    executed = await m.finish_one()
    # A flow id changed after the hand-off was sealed: refused before anything is executed.
    assert executed.outcome.status is RunStatus.failed
    assert executed.code is ErrorCode.FlowFailed
    assert executed.outcome.error is not None
    assert "sealed secret does not open" in executed.outcome.error.message


def test_a_run_time_limit_above_the_cap_is_rejected() -> None:
    world = fleet(machines=(machine("m1"),), connections=(credentials("c1", machine_id="m1"),))
    too_long = request(connection_id="c1", max_run_s=3601)
    decision = admit(too_long, world, max_run_cap_s=3600)
    assert isinstance(decision, Rejection)
    assert decision.code is ErrorCode.InvalidRunRequest
    assert "3600" in decision.message
    assert not isinstance(
        admit(request(connection_id="c1", max_run_s=3600), world, 3600), Rejection
    )


async def test_intake_applies_the_cap_from_the_settings() -> None:
    world = World(
        fleet(machines=(machine("m1"),), connections=(credentials("c1", machine_id="m1"),)),
        max_run_cap_s=600,
    )
    await world.submit(request_payload(run_id="r1", connection_id="c1", max_run_s=601))
    await world.submit(request_payload(run_id="r2", connection_id="c1", max_run_s=600))
    rejected = await world.run("r1")
    assert rejected.status is RunStatus.rejected
    assert rejected.error is not None and rejected.error.code is ErrorCode.InvalidRunRequest
    assert (await world.run("r2")).status is RunStatus.queued
    await world.lifecycle.aclose()
