"""Repairing the store from what workers report, for when Redis lost its last writes (a
host crash inside AOF's one-second window, a failover to a lagging replica).

A worker's heartbeat lists the runs it is running and its last outcomes, each with the fencing
token it ran under. A run the store still holds as ``dispatched`` to that machine under that
token was started (the start was lost): it becomes ``running``. A run the store still holds as
``dispatched`` or ``running`` there under that token has finished (the outcome was lost): the
reported outcome is recorded. Both go through the same fenced scripts as the normal path, so a
report can never move a run that was since given to another machine or token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.records import OutboxMessage, error_fragment
from dispatcher.adapters.redis_store import RunStore
from dispatcher.codes import ErrorCode
from dispatcher.models import Heartbeat, RunStatus
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        runs: RunStore,
        publisher: OutboxPublisher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.publisher = publisher
        self.clock = clock

    async def heartbeat(self, heartbeat: Heartbeat) -> int:
        """Apply what the heartbeat proves and the store does not know; returns how many."""
        reports = [(r.run_id, r.fence) for r in heartbeat.running] + [
            (f.run_id, f.fence) for f in heartbeat.finished
        ]
        if not reports:
            return 0
        states = await self.runs.states([run_id for run_id, _ in reports])
        machine, now = heartbeat.machine_id, self.clock()
        messages: list[OutboxMessage] = []
        repaired = 0
        running = len(heartbeat.running)
        for index, ((run_id, fence), (status, known_fence, known_machine)) in enumerate(
            zip(reports, states, strict=True)
        ):
            if known_fence != fence or known_machine != machine:
                continue
            if index < running and status == RunStatus.dispatched.value:
                log.warning(
                    "run %s runs on %s but its start was lost: recording it", run_id, machine
                )
                outcome = await self.runs.start(
                    run_id,
                    machine_id=machine,
                    fence=fence,
                    run_deadline=now + self.settings.max_run_s + self.settings.running_grace_s,
                    worker_id=heartbeat.worker_id,
                    now=now,
                )
            elif index >= running and status in {"dispatched", "running"}:
                report = heartbeat.finished[index - running]
                log.warning(
                    "run %s finished on %s but its outcome was lost: recording it", run_id, machine
                )
                error = ""
                if report.status != RunStatus.succeeded.value:
                    code = ErrorCode.__members__.get(report.code or "", ErrorCode.FlowFailed)
                    error = error_fragment(code, "recorded from the worker's report")
                outcome = await self.runs.finish(
                    run_id,
                    machine_id=machine,
                    fence=fence,
                    allowed=(RunStatus.dispatched, RunStatus.running),
                    status=RunStatus(report.status),
                    now=now,
                    error=error,
                    detail={"reconciled": True},
                )
            else:
                continue
            if outcome.ok:
                repaired += 1
                messages.extend(outcome.messages)
        await self.publisher.send(messages)
        return repaired
