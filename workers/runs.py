"""What this worker is running, and the outcomes it recorded lately (shared by its jobs)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from dispatcher.codes import ErrorCode
from dispatcher.models import Assignment, FinishedRef, RunningRef

# The last outcomes, reported with every heartbeat (bounded: a few minutes' worth).
RECENT_OUTCOMES = 50


@dataclass
class Running:
    """A run whose flow executes here; ``cancel_reason`` is set when it is being stopped
    (the run then ends with ``stop_code``: ``Cancelled``, or ``WorkerStopped`` when the
    worker stops and the flow outlasted its grace)."""

    assignment: Assignment
    task: asyncio.Task[None]
    cancel_reason: str | None = None
    stop_code: ErrorCode = ErrorCode.Cancelled


class WorkerRuns:
    """The runs of one worker: running ones by id, and the recent outcomes."""

    def __init__(self) -> None:
        self.running: dict[str, Running] = {}
        self.finished: collections.deque[FinishedRef] = collections.deque(maxlen=RECENT_OUTCOMES)

    def stop(self, run_id: str, reason: str, code: ErrorCode = ErrorCode.Cancelled) -> bool:
        """Stop a running flow (the run then ends ``cancelled`` with ``reason``, ``failed``
        with ``code`` when it is not ``Cancelled``, or as the dispatcher says); False when it
        does not run here or is being stopped already."""
        item = self.running.get(run_id)
        if item is None or item.cancel_reason is not None:
            return False
        item.cancel_reason = reason
        item.stop_code = code
        item.task.cancel()
        return True

    def running_refs(self) -> tuple[RunningRef, ...]:
        return tuple(
            RunningRef(run_id=run_id, fence=item.assignment.fence)
            for run_id, item in self.running.items()
        )
