"""Cancelling a run, wherever it is: queued (removed, ``cancelled``), dispatched (``cancelled``;
its worker will refuse to start it) or running (marked ``cancel_requested`` and its worker told
to stop the flow, through the outbox like every other message; the worker then reports
``cancelled``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from dispatcher.codes import ErrorCode
from dispatcher.errors import NotFound
from dispatcher.models import Run, RunError, RunStatus
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import Ending, QueueEnding, RunReads
from dispatcher.usecases.results import CancelRequested, Finished, Unqueued

# A run that moves between the read and the transition is read again, at most this often.
ATTEMPTS = 5


class Canceller:
    def __init__(
        self,
        *,
        runs: RunReads,
        lifecycle: Lifecycle,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runs = runs
        self.lifecycle = lifecycle
        self.clock = clock

    async def cancel(self, run_id: str, reason: str) -> Run:
        """Cancel ``run_id``; returns the record after the request (terminal or stopping)."""
        for _attempt in range(ATTEMPTS):
            run = await self._get(run_id)
            if run.status.terminal:
                return run
            if await self._cancel(run, reason, self.clock()):
                return await self.runs.get(run_id) or run
        return await self._get(run_id)

    async def _cancel(self, run: Run, reason: str, now: float) -> bool:
        """One try at the transition the run's status calls for; False if the run moved."""
        error = RunError(code=ErrorCode.Cancelled, message=reason)
        async with self.lifecycle.window() as window:
            if run.status is RunStatus.queued:
                ending = QueueEnding(
                    status=RunStatus.cancelled, error=error, detail={"reason": reason}
                )
                return isinstance(await window.unqueue(run, ending, now), Unqueued)
            if run.status is RunStatus.dispatched:
                stop = Ending(
                    run_id=run.run_id,
                    machine_id=run.machine_id or "",
                    fence=run.fence,
                    allowed=(RunStatus.dispatched,),
                    status=RunStatus.cancelled,
                    error=error,
                    detail={"reason": reason},
                )
                return isinstance(await window.finish(stop, now), Finished)
            result = await window.request_cancel(run, reason=reason, now=now)
            return isinstance(result, CancelRequested)

    async def _get(self, run_id: str) -> Run:
        run = await self.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return run
