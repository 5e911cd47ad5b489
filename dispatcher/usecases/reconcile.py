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
from collections.abc import Callable, Sequence

from dispatcher.codes import ErrorCode
from dispatcher.logs import fields
from dispatcher.models import Heartbeat, RunError, RunStatus
from dispatcher.settings import Settings
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import Ending, RunReads, Start
from dispatcher.usecases.results import Finished, Started

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        runs: RunReads,
        lifecycle: Lifecycle,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.lifecycle = lifecycle
        self.clock = clock

    async def heartbeat(self, heartbeat: Heartbeat) -> int:
        """Apply what the heartbeat proves and the store does not know; returns how many."""
        return await self.heartbeats([heartbeat])

    async def heartbeats(self, heartbeats: Sequence[Heartbeat]) -> int:
        """The same for a batch of heartbeats: one read of the states of every reported run,
        one window for the repairs (none in the normal case)."""
        reports: list[tuple[Heartbeat, int, str, int]] = []
        for heartbeat in heartbeats:
            reports += [(heartbeat, i, r.run_id, r.fence) for i, r in enumerate(heartbeat.running)]
            running = len(heartbeat.running)
            reports += [
                (heartbeat, running + i, f.run_id, f.fence)
                for i, f in enumerate(heartbeat.finished)
            ]
        if not reports:
            return 0
        states = await self.runs.states([run_id for _, _, run_id, _ in reports])
        now = self.clock()
        starts: list[Start] = []
        endings: list[Ending] = []
        for (heartbeat, index, run_id, fence), state in zip(reports, states, strict=True):
            machine, running = heartbeat.machine_id, len(heartbeat.running)
            if state.fence != fence or state.machine_id != machine:
                continue
            if index < running and state.status is RunStatus.dispatched:
                log.warning(
                    "run %s runs on %s but its start was lost: recording it",
                    run_id,
                    machine,
                    extra=fields(run_id=run_id, machine_id=machine),
                )
                deadline = now + self.settings.max_run_s + self.settings.running_grace_s
                starts.append(Start(run_id, fence, deadline, machine, heartbeat.worker_id))
            elif index >= running and state.status in (RunStatus.dispatched, RunStatus.running):
                report = heartbeat.finished[index - running]
                log.warning(
                    "run %s finished on %s but its outcome was lost: recording it",
                    run_id,
                    machine,
                    extra=fields(run_id=run_id, machine_id=machine),
                )
                error = None
                if report.status != RunStatus.succeeded.value:
                    code = ErrorCode.__members__.get(report.code or "", ErrorCode.FlowFailed)
                    error = RunError(code=code, message="recorded from the worker's report")
                endings.append(
                    Ending(
                        run_id=run_id,
                        machine_id=machine,
                        fence=fence,
                        allowed=(RunStatus.dispatched, RunStatus.running),
                        status=RunStatus(report.status),
                        error=error,
                        detail={"reconciled": True},
                    )
                )
        if not starts and not endings:
            return 0  # the normal case: the store knows everything the workers report
        async with self.lifecycle.window() as window:
            started = await window.start_many(starts, now)
            finished = await window.finish_many(endings, now)
        return sum(isinstance(r, Started) for r in started) + sum(
            isinstance(r, Finished) for r in finished
        )
