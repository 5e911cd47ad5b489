"""Cancelling a run, wherever it is: queued (removed), dispatched (the worker will refuse to
start it) or running (the worker is told to stop the flow, then reports ``cancelled``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.records import OutboxMessage, error_fragment
from dispatcher.adapters.redis_store import RunStore
from dispatcher.codes import ErrorCode
from dispatcher.errors import NotFound
from dispatcher.models import Run, RunStatus


class Canceller:
    def __init__(
        self,
        *,
        runs: RunStore,
        publisher: OutboxPublisher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runs = runs
        self.publisher = publisher
        self.clock = clock

    async def cancel(self, run_id: str, reason: str) -> Run:
        """Cancel ``run_id``; returns the record after the request (terminal or stopping)."""
        for _attempt in range(5):
            found = await self.runs.get(run_id)
            if found is None:
                raise NotFound(f"run {run_id!r} does not exist")
            run = found
            if run.status.terminal:
                return run
            now = self.clock()
            error = error_fragment(ErrorCode.Cancelled, reason)
            if run.status is RunStatus.queued:
                outcome = await self.runs.unqueue(
                    run,
                    status=RunStatus.cancelled,
                    error=error,
                    now=now,
                    due_only=False,
                    detail={"reason": reason},
                )
            elif run.status is RunStatus.dispatched:
                outcome = await self.runs.finish(
                    run_id,
                    machine_id=run.machine_id or "",
                    fence=run.fence,
                    allowed=(RunStatus.dispatched,),
                    status=RunStatus.cancelled,
                    now=now,
                    error=error,
                    detail={"reason": reason},
                )
            else:
                await self._ask_worker_to_stop(run, reason, now)
                return run
            if outcome.ok:
                await self.publisher.send(outcome.messages)
                return await self.runs.get(run_id) or run
        final = await self.runs.get(run_id)
        if final is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return final

    async def _ask_worker_to_stop(self, run: Run, reason: str, now: float) -> None:
        await self.runs.redis.hset(self.runs.names.run(run.run_id), "cancel_requested", "true")
        await self.runs.note(run.run_id, "cancel_requested", now, {"reason": reason})
        body = json.dumps({"run_id": run.run_id, "fence": run.fence, "reason": reason})
        message = OutboxMessage("", "cancel", run.machine_id or "", body.encode())
        await self.publisher.amqp.publish_outbox([message])
