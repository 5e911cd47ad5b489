"""Outputs above ``max_output_bytes`` end the run ``failed`` with OutputsTooLarge (outputs
dropped); the runs after it go on normally; an error text above the limit is cut."""

from __future__ import annotations

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.models import RunStatus
from tests.usecases.test_worker import MachineFactory, machines
from workers.executors import FlowContext, FlowResult

__all__ = ["machines"]  # the fixture, shared with test_worker

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Sized:
    """Returns ``inputs.size`` bytes of outputs, or fails with that much error text."""

    async def run(self, context: FlowContext) -> FlowResult:
        size = int(context.inputs["size"])
        if context.inputs.get("fail"):
            return FlowResult(False, code=ErrorCode.FlowFailed, message="e" * size)
        return FlowResult(True, outputs={"data": "x" * size})


async def test_oversized_outputs_fail_the_run_and_the_next_runs_go_on(
    machines: MachineFactory,
) -> None:
    m = machines(Sized())
    limit = m.world.settings.max_output_bytes
    for run_id, size, fail in (("big", 10 * limit, False), ("small", 10, False)):
        delivery = await m.dispatch(run_id, size=size, fail=fail)
        await m.worker.intake.handle([delivery])
        await m.finish_one()
    big = await m.world.run("big")
    assert big.status is RunStatus.failed
    assert big.error is not None and big.error.code is ErrorCode.OutputsTooLarge
    assert not big.outputs
    small = await m.world.run("small")
    assert small.status is RunStatus.succeeded and small.outputs == {"data": "x" * 10}


async def test_an_oversized_error_text_is_cut(machines: MachineFactory) -> None:
    m = machines(Sized())
    limit = m.world.settings.max_output_bytes
    delivery = await m.dispatch("loud", size=5 * limit, fail=True)
    await m.worker.intake.handle([delivery])
    await m.finish_one()
    run = await m.world.run("loud")
    assert run.status is RunStatus.failed and run.error is not None
    assert run.error.code is ErrorCode.FlowFailed
    assert limit <= len(run.error.message.encode()) < limit + 100
