"""Running flows: one task per started run, with its time limit, its sealed secret opened for
the flow only, and cancellation. Each outcome goes to the reporter's queue."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from dispatcher.codes import ErrorCode
from dispatcher.crypto import WorkerKeyPair, handoff_binding
from dispatcher.logs import bind
from dispatcher.metrics.hooks import WorkerHooks
from dispatcher.models import Assignment, RunError, RunStatus
from workers.executors import Executor, FlowContext, FlowResult
from workers.ports import Outcome
from workers.runs import Running, WorkerRuns

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Executed:
    """A run's outcome, how long its flow took, and the flow's error code."""

    outcome: Outcome
    duration_s: float
    code: ErrorCode | None


class Runner:
    """Starts flows and collects their outcomes in ``done``."""

    def __init__(
        self,
        *,
        executor: Executor,
        keys: WorkerKeyPair,
        runs: WorkerRuns,
        metrics: WorkerHooks,
        max_output_bytes: int = 64 * 1024,
    ) -> None:
        self.executor = executor
        self.keys = keys
        self.runs = runs
        self.metrics = metrics
        self.max_output_bytes = max_output_bytes
        self.done: asyncio.Queue[Executed] = asyncio.Queue()

    def open_secret(self, assignment: Assignment) -> dict[str, Any]:
        """The assignment's secret, opened with the binding computed from the assignment as
        received (run, this machine, fence, flow, inputs): raises SealedDataError when any of
        them is not what the dispatcher sealed it for."""
        if not assignment.sealed_secret:
            return {}
        binding = handoff_binding(
            assignment.run_id,
            assignment.machine_id,
            assignment.fence,
            assignment.flow_id,
            assignment.inputs,
        )
        secret = json.loads(self.keys.open(assignment.sealed_secret, binding))
        return secret if isinstance(secret, dict) else {}

    def refuse(self, assignment: Assignment, reason: str) -> None:
        """Report a started run failed without running its flow (its hand-off was refused)."""
        self.metrics.executor_error("handoff_refused")
        error = RunError(code=ErrorCode.FlowFailed, message=reason)
        outcome = Outcome(assignment.run_id, assignment.fence, RunStatus.failed, error)
        self.done.put_nowait(Executed(outcome, 0.0, ErrorCode.FlowFailed))

    def launch(self, assignment: Assignment, secret: dict[str, Any]) -> None:
        """Run the flow of a started run (its start is recorded and on disk already) with its
        opened ``secret``."""
        task = asyncio.create_task(
            self._execute(assignment, secret), name=f"run:{assignment.run_id}"
        )
        task.add_done_callback(lambda done: self._stopped_before_start(done, assignment))
        self.runs.running[assignment.run_id] = Running(assignment, task)

    def _stopped_before_start(self, task: asyncio.Task[None], assignment: Assignment) -> None:
        """A run stopped before its task ever ran never reaches ``_execute``'s handler: its
        outcome is ``cancelled`` all the same (a task cancelled without a reason is the
        worker shutting down: nothing to report)."""
        item = self.runs.running.get(assignment.run_id)
        if not task.cancelled() or item is None or item.cancel_reason is None:
            return
        code = item.stop_code
        status = RunStatus.cancelled if code is ErrorCode.Cancelled else RunStatus.failed
        error = RunError(code=code, message=item.cancel_reason)
        outcome = Outcome(assignment.run_id, assignment.fence, status, error)
        self.done.put_nowait(Executed(outcome, 0.0, code))

    async def _execute(self, assignment: Assignment, secret: dict[str, Any]) -> None:
        run_id = assignment.run_id
        bind(run_id=run_id)  # this flow's task: every record it logs carries its run
        started = time.monotonic()
        try:
            result = await self._run_flow(assignment, secret)
        except asyncio.CancelledError:
            item = self.runs.running.get(run_id)
            if item is None or item.cancel_reason is None:
                raise
            result = FlowResult(False, code=item.stop_code, message=item.cancel_reason)
        result = self._bounded(result)
        status = RunStatus.succeeded if result.succeeded else RunStatus.failed
        if result.code is ErrorCode.Cancelled:
            status = RunStatus.cancelled
        error = (
            None
            if result.succeeded
            else RunError(code=result.code or ErrorCode.FlowFailed, message=result.message)
        )
        outcome = Outcome(run_id, assignment.fence, status, error, result.outputs or None)
        self.done.put_nowait(Executed(outcome, time.monotonic() - started, result.code))

    def _bounded(self, result: FlowResult) -> FlowResult:
        """The result within the size limit: outputs above it fail the run (OutputsTooLarge,
        outputs dropped); an error text above it is cut."""
        limit = self.max_output_bytes
        size = len(json.dumps(result.outputs, default=str).encode()) if result.outputs else 0
        if size > limit:
            return FlowResult(
                False,
                code=ErrorCode.OutputsTooLarge,
                message=f"the flow's outputs are {size} bytes, above the limit of {limit} bytes",
            )
        encoded = result.message.encode()
        if len(encoded) > limit:
            cut = encoded[:limit].decode(errors="ignore")
            return FlowResult(
                result.succeeded,
                result.outputs,
                result.code,
                f"{cut} ... (cut at {limit} bytes)",
                result.executor_error,
            )
        return result

    async def _run_flow(self, assignment: Assignment, secret: dict[str, Any]) -> FlowResult:
        context = FlowContext(
            run_id=assignment.run_id,
            flow_id=assignment.flow_id,
            user=assignment.user,
            inputs=assignment.inputs,
            secret=secret,
            fence=assignment.fence,
        )
        try:
            async with asyncio.timeout(assignment.time_limit_s):  # cheaper than wait_for
                result = await self.executor.run(context)
        except TimeoutError:
            self.metrics.executor_error("timeout")
            return FlowResult(
                False,
                code=ErrorCode.DesktopFlowsActionTimeout,
                message=f"the flow ran longer than {assignment.time_limit_s:g} s and was stopped",
            )
        except Exception as exc:
            # Whatever the executor raises (a program that cannot be started, a NUL byte in an
            # argument, a bug), the run ends now with a code, not at its time limit + grace.
            log.warning("run %s: the executor raised %s", assignment.run_id, type(exc).__name__)
            self.metrics.executor_error("crashed")
            return FlowResult(
                False,
                code=ErrorCode.ExecutorFailed,
                message=f"the executor could not run the flow: {type(exc).__name__}",
                executor_error="crashed",
            )
        if result.executor_error is not None:
            log.warning("run %s: %s", assignment.run_id, result.message)  # run_id is bound
            self.metrics.executor_error(result.executor_error)
        return result
