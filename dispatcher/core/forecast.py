"""When will a queued run start, and will it make its queue deadline?

``predict_starts`` plays the target's queue forward from ``now``: each machine run frees its
slot at ``now`` + its expected remaining slot time (given how long it has run already) + the
target's hand-over time, and at every such moment a placement pass places lane heads in queue
order through the placer's rules (``core.simulation.place_pass``, i.e. ``select_machine``).
A placed run's expected slot time is its flow's, when the target has enough history of that
flow, else its kind's (``ServiceModel.estimate``). A run still queued at its deadline leaves,
as the sweeper would make it, so the runs behind it move up. A run that no machine could take
even with all slots free (no active session for an attended user, every machine offline...)
gets no time, but the reason per machine.

Confidence. A predicted start is ``now`` + a chain of slot times (what runs on the slot before
it). The chain's standard deviation ``sd`` adds the spread of each slot time (variance) and the
standard error of each mean (taken as fully correlated, so errors add up); ``spread = sd / wait``.
The label also asks how many samples the thinnest statistic in the chain rests on:

* ``high``: spread <= 0.25 and >= 20 samples (or the run can start at once: no chain);
* ``medium``: spread <= 0.5 and >= 5 samples;
* ``low``: anything else, e.g. a target without history (the prior slot time is used).

For a run predicted to time out, the label says how sure the miss is: with ``f`` the moment the
first slot it could use frees after its deadline ``D``, ``z = (f - D) / sd``; ``high`` needs
z >= 2, ``medium`` z >= 1 (same sample minima).

Whether a miss is certain enough to end a run early is ``core.misses``'s question.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.core.selection import machine_verdict
from dispatcher.core.service_model import Estimate, ServiceModel
from dispatcher.core.simulation import Lanes, Waiting, idle, never_eligible, place_pass, release
from dispatcher.models import (
    AssignedRun,
    Connection,
    ConnectionKind,
    MachineView,
    Mode,
    Priority,
)

HIGH_SPREAD, HIGH_SAMPLES = 0.25, 20.0
MEDIUM_SPREAD, MEDIUM_SAMPLES = 0.5, 5.0


class Outlook(StrEnum):
    starts = "starts"  # it is placed before its deadline: ``start_at`` is set
    times_out = "times_out"  # the queue ahead does not clear before its deadline
    no_machine = "no_machine"  # no machine of the target can take it, as the fleet is now


class Confidence(StrEnum):
    high = "high"
    medium = "medium"
    low = "low"


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """A queued run of the target, as the forecast needs it (passed in queue order)."""

    run_id: str
    connection_id: str
    mode: Mode
    flow_id: str | None = None
    queue_deadline: float | None = None
    priority: Priority = Priority.normal
    fail_early: bool = False


def _lane(run: QueuedRun) -> str:
    return lane_of(run.connection_id, run.mode.value, run.priority.value)


@dataclass(frozen=True, slots=True)
class Occupant:
    """A run dispatched to a machine: since when, and what it runs (for its remaining time)."""

    since: float
    kind: ConnectionKind | None = None
    flow_id: str | None = None


@dataclass(frozen=True, slots=True)
class Prediction:
    run_id: str
    outlook: Outlook
    start_at: float | None
    confidence: Confidence
    spread: float | None = None  # sd / wait of a predicted start (0: starts at once)
    samples: float | None = None  # the thinnest history behind it (None: needs none)
    reasons: Mapping[str, ErrorCode] = field(default_factory=dict)  # for no_machine


@dataclass(frozen=True, slots=True)
class _Chain:
    """The slot times a start waits for: their summed variance, summed standard errors of
    their means, and the fewest samples among them."""

    variance: float = 0.0
    error: float = 0.0
    samples: float = math.inf

    def then(self, variance: float, estimate: Estimate) -> _Chain:
        error = math.sqrt(estimate.variance / max(estimate.samples, 1.0))
        return _Chain(
            self.variance + variance, self.error + error, min(self.samples, estimate.samples)
        )

    @property
    def sd(self) -> float:
        return math.sqrt(self.variance + self.error**2)


def _label(
    closeness: float, samples: float, high: float, medium: float, *, below: bool
) -> Confidence:
    def ok(limit: float) -> bool:
        return closeness <= limit if below else closeness >= limit

    if ok(high) and samples >= HIGH_SAMPLES:
        return Confidence.high
    if ok(medium) and samples >= MEDIUM_SAMPLES:
        return Confidence.medium
    return Confidence.low


class _Forecast:
    """One play of the queue forward; ``optimistic`` takes low quantiles and no start lag."""

    def __init__(
        self,
        views: Sequence[MachineView],
        connections: Mapping[str, Connection],
        model: ServiceModel,
        now: float,
        occupants: Mapping[str, Occupant],
        *,
        optimistic: bool,
        quantile: float,
        slack_s: float,
        seed: int,
    ) -> None:
        self.views = {view.machine_id: view for view in views}
        self.connections = connections
        self.model = model
        self.now = now
        self.optimistic = optimistic
        self.quantile = quantile
        self.slack_s = slack_s
        self.rng = random.Random(seed)
        self._estimates: dict[tuple[ConnectionKind | None, str | None], Estimate] = {}
        self.ends: list[tuple[float, int, str, str, _Chain]] = []
        for view in views:
            for run in view.assigned:
                self._occupied(view.machine_id, run, occupants.get(run.run_id))

    def estimate(self, kind: ConnectionKind | None, flow_id: str | None) -> Estimate:
        key = (kind, flow_id)
        if key not in self._estimates:
            self._estimates[key] = self.model.estimate(kind, flow_id, self.now)
        return self._estimates[key]

    def _occupied(self, machine_id: str, run: AssignedRun, occupant: Occupant | None) -> None:
        elapsed = max(0.0, self.now - occupant.since) if occupant is not None else 0.0
        kind, flow = (occupant.kind, occupant.flow_id) if occupant is not None else (None, None)
        estimate = self.estimate(kind, flow)
        if self.optimistic:
            rest, variance = estimate.remaining_low(elapsed, self.quantile), 0.0
        else:
            rest, variance = estimate.remaining(elapsed)
            rest += self.model.handover
        chain = _Chain().then(variance, estimate)
        heapq.heappush(self.ends, (self.now + rest, len(self.ends), machine_id, run.run_id, chain))

    def run(self, queued: Sequence[QueuedRun]) -> dict[str, Prediction]:
        predictions: dict[str, Prediction] = {}
        lanes = Lanes()
        eligible: dict[str, frozenset[str]] = {}
        deadlines: list[tuple[float, str]] = []
        by_id = {run.run_id: run for run in queued}
        for index, run in enumerate(queued):
            waiting = Waiting(run.run_id, run.connection_id, run.mode, run.priority, float(index))
            if waiting.lane not in eligible:
                eligible[waiting.lane] = self._eligible(run)
            if not eligible[waiting.lane]:
                connection = self.connections.get(run.connection_id)
                reasons = never_eligible(self.views.values(), connection, run.mode) or {}
                predictions[run.run_id] = Prediction(
                    run.run_id, Outlook.no_machine, None, Confidence.high, reasons=dict(reasons)
                )
                continue
            if run.queue_deadline is not None and run.queue_deadline + self.slack_s <= self.now:
                # Overdue: the sweeper is about to end it.
                predictions[run.run_id] = self._timed_out(run, self.now, eligible)
                continue
            lanes.add(waiting)
            if run.queue_deadline is not None:
                heapq.heappush(deadlines, (run.queue_deadline + self.slack_s, run.run_id))
        t, trigger, released = self.now, _Chain(), set(self.views)
        first = True
        while len(lanes):
            if released:
                # After the first pass every head left is one no machine could take: only the
                # machines freed since can take one now (see place_pass).
                placed, _ = place_pass(
                    lanes, self.views, self.connections, self.rng,
                    only=None if first else released,
                )  # fmt: skip
                first = False
                for placement in placed:
                    run = by_id[placement.run.run_id]
                    predictions[run.run_id] = self._start(run, placement.machine_id, t, trigger)
            if not len(lanes):
                break
            while deadlines and deadlines[0][1] not in lanes:
                heapq.heappop(deadlines)
            next_end = self.ends[0][0] if self.ends else math.inf
            next_deadline = deadlines[0][0] if deadlines else math.inf
            t = min(next_end, next_deadline)
            if math.isinf(t):
                break  # cannot happen: every lane left is eligible somewhere, every slot frees
            trigger, released = _Chain(), set()
            while self.ends and self.ends[0][0] <= t:
                _, _, machine_id, run_id, chain = heapq.heappop(self.ends)
                self.views[machine_id] = release(self.views[machine_id], run_id)
                trigger = chain if chain.sd >= trigger.sd else trigger
                released.add(machine_id)
            while deadlines and deadlines[0][0] <= t:
                _, run_id = heapq.heappop(deadlines)
                if lanes.remove(run_id) is not None:
                    predictions[run_id] = self._timed_out(by_id[run_id], t, eligible)
        for run in queued:  # defensive: whatever is left has nowhere to go
            if run.run_id not in predictions:
                predictions[run.run_id] = Prediction(
                    run.run_id, Outlook.times_out, None, Confidence.low
                )
        return predictions

    def _eligible(self, run: QueuedRun) -> frozenset[str]:
        connection = self.connections.get(run.connection_id)
        if connection is None:
            return frozenset()
        return frozenset(
            machine_id
            for machine_id, view in self.views.items()
            if machine_verdict(idle(view), connection, run.mode) is None
        )

    def _kind(self, run: QueuedRun) -> ConnectionKind | None:
        connection = self.connections.get(run.connection_id)
        return connection.kind if connection is not None else None

    def _start(self, run: QueuedRun, machine_id: str, t: float, chain: _Chain) -> Prediction:
        kind = self._kind(run)
        estimate = self.estimate(kind, run.flow_id)
        if self.optimistic:
            slot_time, variance, lag = estimate.low(self.quantile), 0.0, 0.0
        else:
            slot_time, variance = estimate.mean + self.model.handover, estimate.variance
            lag = self.model.start_lag(kind)
        end = _Chain(chain.variance, chain.error, chain.samples).then(variance, estimate)
        heapq.heappush(self.ends, (t + slot_time, len(self.ends), machine_id, run.run_id, end))
        wait = t + lag - self.now
        if chain.samples == math.inf:  # placed at once: nothing to wait for
            return Prediction(run.run_id, Outlook.starts, t + lag, Confidence.high, 0.0, None)
        spread = chain.sd / wait if wait > 0 else 0.0
        confidence = _label(spread, chain.samples, HIGH_SPREAD, MEDIUM_SPREAD, below=True)
        return Prediction(run.run_id, Outlook.starts, t + lag, confidence, spread, chain.samples)

    def _timed_out(
        self, run: QueuedRun, deadline: float, eligible: Mapping[str, frozenset[str]]
    ) -> Prediction:
        machines = eligible[_lane(run)]
        frees = [(end, chain) for end, _, m, _, chain in self.ends if m in machines]
        if not frees:
            return Prediction(run.run_id, Outlook.times_out, None, Confidence.low)
        free_at, chain = min(frees, key=lambda item: item[0])
        z = (free_at - deadline) / chain.sd if chain.sd > 0 else math.inf
        confidence = _label(z, chain.samples, 2.0, 1.0, below=False)
        return Prediction(run.run_id, Outlook.times_out, None, confidence, None, chain.samples)


def predict_starts(
    queued: Sequence[QueuedRun],
    views: Sequence[MachineView],
    connections: Mapping[str, Connection],
    model: ServiceModel,
    now: float,
    *,
    occupants: Mapping[str, Occupant] | None = None,
    optimistic: bool = False,
    quantile: float = 0.05,
    slack_s: float = 0.0,
    seed: int = 0,
) -> list[Prediction]:
    """A prediction for each of ``queued`` (the target's queue, or its head, in queue order).

    ``views`` are the target's machines with what is assigned to them; ``occupants`` says
    since when each assigned run holds its slot and what it runs (an unknown one counts as
    just dispatched, with the target's overall slot time). Cost: one placement pass per slot
    freed while the given runs wait, each lanes x machines; callers bound ``queued``.

    ``optimistic`` plays the queue with every slot time at its ``quantile`` and no start lag,
    and lets runs wait ``slack_s`` past their deadline (the fail-early rule, ``core.misses``).
    """
    forecast = _Forecast(
        views,
        connections,
        model,
        now,
        occupants or {},
        optimistic=optimistic,
        quantile=quantile,
        slack_s=slack_s,
        seed=seed,
    )
    result = forecast.run(queued)
    return [result[run.run_id] for run in queued]
