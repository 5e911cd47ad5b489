"""Repairing the store from what workers report, for when Redis lost its last writes (a
host crash inside AOF's one-second window, a failover to a lagging replica).

A worker's heartbeat lists the runs it is running and its last outcomes, each with the fencing
token it ran under. A run the store still holds as ``dispatched`` to that machine under that
token was started (the start was lost): it becomes ``running``. A run the store holds as
``queued``, or ``dispatched`` under another hand-off, lost its claim too: a worker only runs a
flow once its fenced start was recorded, so the report wins and the run becomes ``running``
on the reporting machine (``adopt.lua``: the other hand-off's start is refused from then on,
and no later hand-off re-uses the fence). A run the store still holds as
``dispatched`` or ``running`` there under that token has finished (the outcome was lost): the
reported outcome is recorded. Both go through the same fenced scripts as the normal path, so a
report can never move a run that was since given to another machine or token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from dispatcher.codes import ErrorCode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.logs import fields
from dispatcher.models import Heartbeat, RunError, RunStatus
from dispatcher.settings import Settings
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import Adoption, Ending, RunReads, Start
from dispatcher.usecases.results import Finished, RunState, Started

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

    async def heartbeat(self, heartbeat: Heartbeat, fleet: FleetSnapshot | None = None) -> int:
        """Apply what the heartbeat proves and the store does not know; returns how many.
        ``fleet``: the session users of adopted runs (their machine slot)."""
        return await self.heartbeats([heartbeat], fleet)

    async def heartbeats(
        self, heartbeats: Sequence[Heartbeat], fleet: FleetSnapshot | None = None
    ) -> int:
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
        lost_claims: dict[str, tuple[Heartbeat, list[tuple[str, int]]]] = {}
        for (heartbeat, index, run_id, fence), state in zip(reports, states, strict=True):
            machine, running = heartbeat.machine_id, len(heartbeat.running)
            if index < running and _lost_claim(state, machine, fence):
                lost_claims.setdefault(machine, (heartbeat, []))[1].append((run_id, fence))
                continue
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
        adoptions: list[Adoption] = []
        for heartbeat, claims in lost_claims.values():
            adoptions += await self._adoptions(heartbeat, list(dict.fromkeys(claims)), fleet, now)
        if not starts and not endings and not adoptions:
            return 0  # the normal case: the store knows everything the workers report
        async with self.lifecycle.window() as window:
            started = await window.start_many(starts, now)
            adopted = await window.adopt_many(adoptions, now)
            finished = await window.finish_many(endings, now)
        return sum(isinstance(r, Started) for r in (*started, *adopted)) + sum(
            isinstance(r, Finished) for r in finished
        )

    async def _adoptions(
        self,
        heartbeat: Heartbeat,
        lost_claims: list[tuple[str, int]],
        fleet: FleetSnapshot | None,
        now: float,
    ) -> list[Adoption]:
        if not lost_claims:
            return []
        machine = heartbeat.machine_id
        deadline = now + self.settings.max_run_s + self.settings.running_grace_s
        adoptions = []
        runs = await self.runs.get_many([run_id for run_id, _ in lost_claims])
        for (run_id, fence), run in zip(lost_claims, runs, strict=True):
            if run is None:
                continue
            log.warning(
                "run %s runs on %s under fence %d but the store lost its claim and start "
                "(it holds it %s): the worker's report wins, recording it running there",
                run_id,
                machine,
                fence,
                run.status.value,
                extra=fields(run_id=run_id, machine_id=machine),
            )
            connection = fleet.connections.get(run.connection_id) if fleet else None
            user = connection.session_user if connection is not None else ""
            adoptions.append(Adoption(run, fence, deadline, machine, heartbeat.worker_id, user))
        return adoptions


def _lost_claim(state: RunState, machine: str, fence: int) -> bool:
    """Whether a run reported running on ``machine`` under ``fence`` lost its claim: the store
    holds it queued, or dispatched under another hand-off (a started run never goes back)."""
    if state.status is RunStatus.queued:
        return True
    return state.status is RunStatus.dispatched and (state.machine_id, state.fence) != (
        machine,
        fence,
    )
