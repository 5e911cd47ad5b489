"""Time-driven chores, each done by one replica at a time (a short lease in Redis), except
queue deadlines, which every replica enforces:

* queue deadlines: a run still queued at its deadline ends ``timed_out`` / NoCandidateMachine,
  with the last per-machine reasons; deadlines live in Redis and the time-out is one atomic
  script, so every live replica enforces them, also right after a restart (no waiting for a
  dead replica's lease to lapse);
* machine liveness: a machine without heartbeats is offline; its runs that never started go
  back to the queue at their old position; its running runs fail after a grace period;
* overdue runs: a run still running long past its time limit (its worker is gone) fails;
* unstarted runs: a run dispatched to a machine that keeps heartbeating but never started it
  within ``start_timeout_s`` (its assignment was lost: the machine queue deleted, the message
  dead-lettered, a script error) goes back to its queue at its old position;
* the outbox relay, and a periodic placement pass over every target with queued runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.core.placement import reasons_payload
from dispatcher.logs import fields
from dispatcher.models import Run, RunError, RunStatus
from dispatcher.settings import Settings
from dispatcher.usecases.foresight import Foresight
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import (
    Ending,
    Leases,
    MachineState,
    PassRequests,
    QueueEnding,
    RunReads,
)
from dispatcher.usecases.results import Requeued, Unqueued

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(
        self,
        *,
        settings: Settings,
        runs: RunReads,
        machines: MachineState,
        lifecycle: Lifecycle,
        placer: PassRequests,
        leases: Leases,
        clock: Callable[[], float] = time.time,
        foresight: Foresight | None = None,
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.machines = machines
        self.lifecycle = lifecycle
        self.placer = placer
        self.leases = leases
        self.clock = clock
        self.foresight = foresight
        self._last_resweep = 0.0
        # Offline machines whose running runs were checked, and when: an offline machine gets
        # no new runs, so after its first check it is checked again only every resweep
        # interval (checking 10,000 silent machines every sweep kept a replica busy).
        self._offline_checked: dict[str, float] = {}
        # Since when this replica could reach Redis without interruption. Heartbeats that
        # arrive while Redis is unreachable cannot be recorded, so for ``offline_after_s``
        # after start-up or an outage no machine is judged on its (stale) last heartbeat.
        self._reachable_since: float | None = clock()

    async def run_forever(self) -> None:
        interval = self.settings.sweep_interval_s
        while True:
            try:
                if await self.leases.hold("sweeper", ttl_s=max(1.5, 3 * interval)):
                    await self.sweep_once()
                else:
                    await self.expire_deadlines(self.clock())
            except Exception:
                log.exception("sweep failed; trying again")
                self._reachable_since = None
            await asyncio.sleep(interval)

    async def sweep_once(self) -> None:
        now = self.clock()
        await self.expire_deadlines(now)
        await self.check_liveness(now)
        await self.fail_overdue(now)
        await self.lifecycle.relay(self.settings.outbox_relay_after_s)
        if now - self._last_resweep >= self.settings.resweep_interval_s:
            self._last_resweep = now
            await self.requeue_unstarted(now)
            self.placer.request(*await self.runs.targets())

    async def expire_deadlines(self, now: float) -> int:
        """Time out every queued run whose deadline has passed."""
        expired = 0
        for run_id in await self.runs.due_deadlines(now):
            run = await self.runs.get(run_id)
            if run is None:
                await self.lifecycle.forget_deadline(run_id)
                continue
            lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
            reasons = reasons_payload(await self.runs.lane_reasons(run.target or "", lane))
            waited = now - (run.queued_at or now)
            ending = QueueEnding(
                status=RunStatus.timed_out,
                error=RunError(
                    code=ErrorCode.NoCandidateMachine,
                    message=f"no machine could take the run within {waited:.0f} s",
                    detail={"reasons": reasons},
                ),
                due_only=True,
                detail={"reasons": reasons},
            )
            async with self.lifecycle.window() as window:
                if isinstance(await window.unqueue(run, ending, now), Unqueued):
                    expired += 1
        return expired

    async def check_liveness(self, now: float) -> None:
        """Mark silent machines offline; requeue their unstarted runs; fail lost running runs."""
        offline_after = self.settings.offline_after_s
        if self._reachable_since is None:
            self._reachable_since = now
        if now - self._reachable_since < offline_after:
            return  # heartbeats missed while the store was unreachable are no evidence
        marks = await self.machines.offline_marks()
        for machine_id in await self.machines.stale(now, offline_after):
            if machine_id not in marks and await self.machines.mark_offline(machine_id, now):
                log.warning(
                    "machine %s is offline (no heartbeat for %.0f s)",
                    machine_id,
                    offline_after,
                    extra=fields(machine_id=machine_id),
                )
                marks[machine_id] = now
                await self._requeue_unstarted(machine_id, now)
                if self.foresight is not None:
                    await self.foresight.keep_machine_change(machine_id, now, online=False)
        checked = self._offline_checked
        for machine_id in [m for m in checked if m not in marks]:
            del checked[machine_id]  # back online
        due = [
            machine_id
            for machine_id, since in marks.items()
            if now - since >= self.settings.running_grace_s
            and now - checked.get(machine_id, -math.inf) >= self.settings.resweep_interval_s
        ]
        # Only the machines that still hold runs are looked at one by one: a fleet with
        # thousands of machines switched off read each of them every resweep.
        holding = await self._runs_on_each(due) if due else {}
        for machine_id in due:
            if holding.get(machine_id):
                await self._fail_running(machine_id, holding[machine_id], now)
            checked[machine_id] = now

    async def _runs_on(self, machine_id: str) -> list[Run]:
        return (await self._runs_on_each([machine_id])).get(machine_id, [])

    async def _runs_on_each(self, machine_ids: list[str]) -> dict[str, list[Run]]:
        """The runs assigned to each of ``machine_ids`` that holds any, in one read for all of
        them (idle machines cost nothing): a read per machine was 10,000 round trips every
        resweep at 10,000 machines (bench/README.md, "live fleet")."""
        assigned = await self.machines.assigned_to(machine_ids)
        run_ids = [a.run_id for runs in assigned.values() for a in runs]
        records = {r.run_id: r for r in await self.runs.get_many(run_ids) if r is not None}
        return {
            machine_id: [records[a.run_id] for a in runs if a.run_id in records]
            for machine_id, runs in assigned.items()
        }

    async def _requeue_unstarted(self, machine_id: str, now: float) -> None:
        requeued: set[str] = set()
        async with self.lifecycle.window() as window:
            for run in await self._runs_on(machine_id):
                if run.status is not RunStatus.dispatched:
                    continue
                result = await window.requeue(run, reason="machine offline", now=now)
                if isinstance(result, Requeued):
                    requeued.add(run.target or "")
        self.placer.request(*requeued)

    async def requeue_unstarted(self, now: float) -> int:
        """Put back in their queue the runs that online machines did not start in time.

        The fenced start refuses the old assignment if it turns up after all, so the run is
        never run twice; a machine offline is left to :meth:`check_liveness`."""
        limit = self.settings.start_timeout_s
        marks = await self.machines.offline_marks()
        requeued: set[str] = set()
        count = 0
        heard = [m for m in await self.machines.stale(now, 0.0) if m not in marks]
        for machine_id, runs in (await self._runs_on_each(heard)).items():
            late = [
                run
                for run in runs
                if run.status is RunStatus.dispatched
                and run.machine_id == machine_id
                and now - (run.dispatched_at or now) > limit
            ]
            if not late:
                continue
            async with self.lifecycle.window() as window:
                for run in late:
                    log.warning(
                        "run %s was not started by %s within %.0f s: back to its queue",
                        run.run_id,
                        machine_id,
                        limit,
                    )
                    reason = f"not started by machine {machine_id} within {limit:g} s"
                    if isinstance(await window.requeue(run, reason=reason, now=now), Requeued):
                        requeued.add(run.target or "")
                        count += 1
        self.placer.request(*requeued)
        return count

    async def _fail_running(self, machine_id: str, runs: list[Run], now: float) -> None:
        lost = RunError(
            code=ErrorCode.MachineLost,
            message=f"machine {machine_id} stopped sending heartbeats while the flow ran",
        )
        requeued: set[str] = set()
        async with self.lifecycle.window() as window:
            for run in runs:
                if run.status is RunStatus.dispatched:
                    result = await window.requeue(run, reason="machine offline", now=now)
                    if isinstance(result, Requeued):
                        requeued.add(run.target or "")
                elif run.status is RunStatus.running:
                    ending = Ending(
                        run_id=run.run_id,
                        machine_id=machine_id,
                        fence=run.fence,
                        allowed=(RunStatus.running,),
                        status=RunStatus.failed,
                        error=lost,
                    )
                    await window.finish(ending, now)
        self.placer.request(*requeued)

    async def fail_overdue(self, now: float) -> None:
        """Fail runs still running well past their time limit (their worker never reported)."""
        overdue = RunError(
            code=ErrorCode.DesktopFlowsActionTimeout,
            message="the run exceeded its time limit and its worker did not stop it",
        )
        for run in await self.runs.get_many(await self.runs.overdue_running(now)):
            if run is None or run.status is not RunStatus.running:
                if run is not None:
                    await self.lifecycle.forget_running(run.run_id)
                continue
            ending = Ending(
                run_id=run.run_id,
                machine_id=run.machine_id or "",
                fence=run.fence,
                allowed=(RunStatus.running,),
                status=RunStatus.failed,
                error=overdue,
            )
            async with self.lifecycle.window() as window:
                await window.finish(ending, now)
