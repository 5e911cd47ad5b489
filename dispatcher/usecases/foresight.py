"""Foresight: predicted starts, predicted misses and fail-early over the live store.

The pure core (``core.forecast``, ``core.misses``, ``core.capacity``) gets its facts here:

* every run that leaves the queue system (its terminal event) becomes a ``TraceRecord`` in the
  ``TraceStore`` (bounded by the trace retention settings);
* a target's ``ServiceModel`` is learnt from its trace, incrementally (each replica keeps the
  models it has read and reads only the newer records);
* ``predict`` plays the head of a target's queue (``forecast_max_runs`` runs) forward on its
  machines as they are now;
* the forecast chore (one replica at a time, every ``forecast_interval_s``) computes each
  target's outlook (earliest queue deadline, runs predicted to miss) for the metrics, and ends
  the runs that asked for ``fail_early`` and certainly miss their deadline
  (``PredictedQueueTimeout``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dispatcher.codes import ErrorCode
from dispatcher.core.capacity import CapacityReport, what_if
from dispatcher.core.forecast import Occupant, Prediction, QueuedRun, predict_starts
from dispatcher.core.misses import FailEarlyPolicy, Miss, predicted_misses
from dispatcher.core.service_model import ServiceModel
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.errors import NotFound, PermanentError
from dispatcher.models import MachineView, Run, RunError, RunStatus, Session
from dispatcher.settings import Settings
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import (
    FleetSource,
    Leases,
    MachineState,
    QueueEnding,
    RunReads,
    TargetOutlook,
    TraceStore,
)
from dispatcher.usecases.results import Unqueued

log = logging.getLogger(__name__)

# Statuses a trace record is written for (a rejected run never queued).
TRACED = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.timed_out}
)


def trace_of(run: Run) -> TraceRecord | None:
    """The trace record of a run that left the system (None: it never queued)."""
    if (
        run.status not in TRACED
        or run.target is None
        or run.connection_kind is None
        or run.queued_at is None
    ):
        return None
    return TraceRecord(
        run_id=run.run_id, target=run.target, connection_id=run.connection_id,
        kind=run.connection_kind, mode=run.mode, priority=run.priority, flow_id=run.flow_id,
        queued_at=run.queued_at,
        queue_deadline=run.queue_deadline if run.queue_deadline is not None else run.queued_at,
        status=run.status, dispatched_at=run.dispatched_at, started_at=run.started_at,
        finished_at=run.finished_at, machine_id=run.machine_id,
    )  # fmt: skip


def _queued_run(run: Run) -> QueuedRun:
    return QueuedRun(
        run.run_id, run.connection_id, run.mode, run.flow_id, run.queue_deadline,
        run.priority, run.fail_early,
    )  # fmt: skip


# A terminal event delivered twice is recorded twice: the runs learnt lately are remembered
# (per target, the last this many) and a repeat is skipped.
RECENT_RUNS = 10_000
# Trace records read and learnt between two turns of the event loop.
LEARN_CHUNK = 500


@dataclass
class _Learnt:
    model: ServiceModel
    last_id: str = "-"
    finishes: dict[str, list[float]] = field(default_factory=dict)
    recent: dict[str, None] = field(default_factory=dict)  # insertion-ordered set of run ids

    def fresh(self, records: Sequence[TraceRecord]) -> list[TraceRecord]:
        kept = []
        for record in records:
            if record.run_id in self.recent:
                continue
            self.recent[record.run_id] = None
            kept.append(record)
        while len(self.recent) > RECENT_RUNS:
            del self.recent[next(iter(self.recent))]
        return kept


@dataclass(frozen=True, slots=True)
class QueueForecast:
    """A target's queue head (in queue order) and a prediction for each of its runs."""

    target: str
    at: float
    runs: list[Run]
    predictions: list[Prediction]
    misses: list[Miss]
    model: ServiceModel


class Foresight:
    """Predictions over the live store; the forecast chore (``run_forever``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        runs: RunReads,
        machines: MachineState,
        fleet: FleetSource,
        traces: TraceStore,
        lifecycle: Lifecycle | None = None,
        leases: Leases | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.machines = machines
        self.fleet = fleet
        self.traces = traces
        self.lifecycle = lifecycle
        self.leases = leases
        self.clock = clock
        self.policy = FailEarlyPolicy(
            min_samples=settings.fail_early_min_samples, margin_s=settings.fail_early_slack_s
        )
        self._learnt: dict[str, _Learnt] = {}

    # ---- recording ------------------------------------------------------------------------
    async def record_finished(self, runs: Sequence[Run]) -> int:
        """Keep what the model and the replay need of runs that left; how many were kept (a
        run that never queued, e.g. rejected, has nothing to keep)."""
        records = [record for record in map(trace_of, runs) if record is not None]
        await self.traces.record(records)
        return len(records)

    async def machine_changed(
        self,
        machine_id: str,
        at: float,
        *,
        online: bool | None = None,
        sessions: Sequence[Session] | None = None,
    ) -> None:
        """Keep a machine's new state (its eligibility) for the capacity replay; what is not
        given (online, sessions) is read from its live state."""
        fleet = await self.fleet.load()
        machine = fleet.machines.get(machine_id)
        if machine is None:
            return
        if online is None or sessions is None:
            (view,) = await self.machines.views([machine], at, self.settings.offline_after_s)
            online = view.online if online is None else online
            sessions = view.sessions if sessions is None else sessions
        change = MachineChange(
            at=at, machine_id=machine_id, online=online, maintenance=machine.maintenance,
            sessions=tuple((session.user, session.state) for session in sessions),
        )  # fmt: skip
        await self.traces.record_changes([change])

    # What the chores call: the trace is statistics, never a reason to hold up a heartbeat, a
    # terminal event (whose metrics are already counted) or an offline machine's requeue.
    async def keep_finished(self, runs: Sequence[Run]) -> None:
        try:
            await self.record_finished(runs)
        except Exception as exc:
            log.warning("%d finished runs not traced: %s", len(runs), exc)

    async def keep_machine_change(
        self,
        machine_id: str,
        at: float,
        *,
        online: bool | None = None,
        sessions: Sequence[Session] | None = None,
    ) -> None:
        try:
            await self.machine_changed(machine_id, at, online=online, sessions=sessions)
        except Exception as exc:
            log.warning("machine change of %s not traced: %s", machine_id, exc)

    async def keep_heartbeat_changes(
        self, heard: Sequence[tuple[str, Sequence[Session]]], at: float
    ) -> None:
        """Machines a batch of heartbeats found back online or with new sessions, kept in one
        write (a replica starting beside 10,000 machines hears each of them for the first
        time, one write each would hold up the heartbeats)."""
        if not heard:
            return
        try:
            fleet = await self.fleet.load()
            changes = [
                MachineChange(
                    at=at,
                    machine_id=machine_id,
                    online=True,
                    maintenance=fleet.machines[machine_id].maintenance,
                    sessions=tuple((session.user, session.state) for session in sessions),
                )
                for machine_id, sessions in heard
                if machine_id in fleet.machines
            ]
            await self.traces.record_changes(changes)
        except Exception as exc:
            log.warning("%d machine changes not traced: %s", len(heard), exc)

    async def model(self, target: str) -> ServiceModel:
        """The target's service model, learnt from its trace (only new records are read)."""
        learnt = self._learnt.get(target)
        if learnt is None:
            learnt = _Learnt(ServiceModel(half_life_s=self.settings.forecast_half_life_s))
            self._learnt[target] = learnt
        while True:
            records, learnt.last_id = await self.traces.read(
                target, learnt.last_id, limit=LEARN_CHUNK
            )
            learnt.model.learn(learnt.fresh(records), learnt.finishes)
            if len(records) < LEARN_CHUNK:
                return learnt.model
            # A replica's first forecast reads the whole trace (up to 20,000 records, ~2 s of
            # parsing and learning here): a chunk at a time, so that placement, intake and the
            # workers' answers on the same event loop do not wait behind it.
            await asyncio.sleep(0)

    # ---- predictions ----------------------------------------------------------------------
    async def _views(self, target: str, now: float) -> list[MachineView]:
        fleet = await self.fleet.load()
        machines = [fleet.machines[m] for m in fleet.machine_ids_of_key(target)]
        return list(await self.machines.views(machines, now, self.settings.offline_after_s))

    async def _occupants(self, views: Sequence[MachineView]) -> dict[str, Occupant]:
        ids = [run.run_id for view in views for run in view.assigned]
        occupants: dict[str, Occupant] = {}
        for run in await self.runs.briefs(ids) if ids else []:
            if run is not None and run.dispatched_at is not None:
                occupants[run.run_id] = Occupant(
                    run.dispatched_at, run.connection_kind, run.flow_id
                )
        return occupants

    async def forecast(self, target: str) -> QueueForecast:
        """Play the head of ``target``'s queue forward (``forecast_max_runs`` runs)."""
        now = self.clock()
        page = await self.runs.queue_page(target, 0, self.settings.forecast_max_runs - 1)
        found = await self.runs.briefs([run_id for run_id, _ in page]) if page else []
        queued = [run for run in found if run is not None and run.status is RunStatus.queued]
        model = await self.model(target)
        views = await self._views(target, now)
        occupants = await self._occupants(views)
        connections = (await self.fleet.load()).connections
        heads = [_queued_run(run) for run in queued]
        predictions = predict_starts(heads, views, connections, model, now, occupants=occupants)
        misses = predicted_misses(
            heads, views, connections, model, now, occupants=occupants,
            predictions=predictions, policy=self.policy,
        )  # fmt: skip
        return QueueForecast(target, now, queued, predictions, misses, model)

    async def predict(self, run: Run) -> Prediction | None:
        """The prediction of one queued run (None: not queued, or deeper than the forecast
        plays its queue)."""
        if run.status is not RunStatus.queued or not run.target:
            return None
        result = await self.forecast(run.target)
        for queued, prediction in zip(result.runs, result.predictions, strict=True):
            if queued.run_id == run.run_id:
                return prediction
        return None

    # ---- capacity -------------------------------------------------------------------------
    async def capacity(self, target: str, add_machines: int, since: float) -> CapacityReport:
        """Replay ``target``'s recorded window on today's fleet and on a changed one."""
        fleet = await self.fleet.load()
        if not target.startswith(("g:", "m:")) or not fleet.machine_ids_of_key(target):
            raise NotFound(f"{target!r} is not a group (g:ID) or machine (m:ID) with machines")
        now = self.clock()
        machines = [fleet.machines[m] for m in sorted(fleet.machines)]
        views = [
            view.model_copy(update={"assigned": (), "online": True})
            for view in await self.machines.views(machines, now, self.settings.offline_after_s)
        ]
        records: list[TraceRecord] = []
        for traced in await self.traces.traced_targets():
            records.extend((await self.traces.read(traced))[0])
        records = list({record.run_id: record for record in records}.values())  # repeats
        records.sort(key=lambda record: record.queued_at)
        changes = [c for c in await self.traces.changes() if c.machine_id in fleet.machines]
        try:
            return what_if(
                records, views, fleet.connections, target=target, add_machines=add_machines,
                since=since, priority_boost_s=self.settings.priority_boost_s, changes=changes,
            )  # fmt: skip
        except ValueError as exc:  # e.g. machines added to a machine target
            raise PermanentError(str(exc)) from exc

    # ---- the chore ------------------------------------------------------------------------
    async def run_forever(self) -> None:
        interval = self.settings.forecast_interval_s
        while True:
            try:
                if self.leases is None or await self.leases.hold(
                    "foresight", ttl_s=max(3.0, 3 * interval)
                ):
                    await self.chore_once()
            except Exception:
                log.exception("forecast failed; trying again")
            await asyncio.sleep(interval)

    async def chore_once(self) -> dict[str, TargetOutlook]:
        """Every target with queued runs: its outlook (saved for the metrics) and fail-early."""
        outlooks: dict[str, TargetOutlook] = {}
        for target in await self.runs.targets():
            result = await self.forecast(target)
            deadlines = [r.queue_deadline for r in result.runs if r.queue_deadline is not None]
            outlooks[target] = TargetOutlook(
                result.at, min(deadlines) if deadlines else None, len(result.misses)
            )
            await self.fail_early(result)
        await self.traces.save_outlooks(outlooks)
        return outlooks

    async def fail_early(self, result: QueueForecast) -> int:
        """End the runs that asked for it and certainly miss their deadline."""
        if self.lifecycle is None:
            return 0
        by_id = {run.run_id: run for run in result.runs}
        ended = 0
        for miss in result.misses:
            if not miss.fail_early:
                continue
            run = by_id[miss.run_id]
            left = (miss.deadline or result.at) - result.at
            error = RunError(
                code=ErrorCode.PredictedQueueTimeout,
                message=(
                    f"the queue ahead cannot clear within the {max(0.0, left):.0f} s left "
                    "before the run's queue deadline"
                ),
                detail={"confidence": miss.confidence.value, "bound_at": _finite(miss.bound_at)},
            )
            ending = QueueEnding(status=RunStatus.timed_out, error=error, due_only=False)
            async with self.lifecycle.window() as window:
                if isinstance(await window.unqueue(run, ending, result.at), Unqueued):
                    ended += 1
                    log.info("run %s ended early: predicted to miss its deadline", run.run_id)
        return ended


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
