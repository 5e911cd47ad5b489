"""Which queued runs will miss their queue deadline, and which of them surely will.

A run is predicted to miss when the forecast (``core.forecast.predict_starts``) has it time
out, or no machine of the target can take it. A run that asked for it (``fail_early``) is ended
at once only when the miss is *certain* by this rule, never on thin data:

1. the target has completed at least ``FailEarlyPolicy.min_samples`` runs (20, decayed) of the
   run's connection kind lately, and the expected forecast has it time out;
2. even optimistically it misses ``deadline + margin_s``: either the forecast played with every
   slot time at its low quantile (``quantile``: 5 %) and no start lag has it time out, or the
   lane bound ``earliest_dispatch`` is past it. The bound uses the runs ahead in the run's own
   lane: they go first, at most one per machine at a time (a user's run occupies a session),
   each holding its slot at least the low quantile; a run ahead that may time out before the
   run's start is not counted. It needs no forecast, so it also decides for a run too deep in
   its queue to play forward (``misses_for_sure``).

A run no machine can take is never certain to miss: a session may open, a machine come back.
Both halves take the fleet as it is now: machines added later or runs cancelled ahead can only
make a run start sooner, which is why the margin is on the optimistic side.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from dispatcher.core.forecast import (
    Confidence,
    Occupant,
    Outlook,
    Prediction,
    QueuedRun,
    predict_starts,
)
from dispatcher.core.ordering import lane_of
from dispatcher.core.selection import machine_verdict, slots_of
from dispatcher.core.service_model import ServiceModel
from dispatcher.core.simulation import idle
from dispatcher.models import AssignedRun, Connection, MachineView, Mode


@dataclass(frozen=True, slots=True)
class FailEarlyPolicy:
    min_samples: float = 20.0
    quantile: float = 0.05
    margin_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Miss:
    """A run predicted to miss its queue deadline."""

    run_id: str
    deadline: float | None
    cause: Outlook  # times_out or no_machine
    confidence: Confidence
    certain: bool  # by the fail-early rule
    fail_early: bool  # certain, and the run asked for it
    bound_at: float | None = None  # the lane bound of its dispatch, when it was evaluated


def lane_free_at(
    views: Sequence[MachineView],
    connection: Connection,
    mode: Mode,
    model: ServiceModel,
    now: float,
    *,
    quantile: float,
    occupants: Mapping[str, Occupant] | None = None,
) -> list[float]:
    """For each machine that can take runs of this connection and mode at all, the earliest
    moment it can take the next one, optimistically (its runs end at their low quantile)."""
    occupants = occupants or {}
    user = connection.session_user.casefold()

    def rest(run: AssignedRun) -> float:
        occupant = occupants.get(run.run_id)
        elapsed = max(0.0, now - occupant.since) if occupant is not None else 0.0
        kind, flow = (occupant.kind, occupant.flow_id) if occupant is not None else (None, None)
        return model.estimate(kind, flow, now).remaining_low(elapsed, quantile)

    free_at: list[float] = []
    for view in views:
        if machine_verdict(idle(view), connection, mode) is not None:
            continue
        free = now
        for run in view.assigned:  # one run per user and machine, whatever the mode
            if run.user.casefold() == user:
                free = max(free, now + rest(run))
        unattended = [run for run in view.assigned if run.mode is Mode.unattended]
        if mode is Mode.unattended and len(unattended) >= slots_of(view):
            free = max(free, now + min(rest(run) for run in unattended))
        free_at.append(free)
    return free_at


def earliest_dispatch(
    free_at: Sequence[float], ahead_deadlines: Sequence[float], shortest_s: float
) -> float:
    """A lower bound of when a run can be dispatched (inf when no machine can take it).

    ``free_at``: when each machine that can take its lane is free for it (``lane_free_at``);
    ``ahead_deadlines``: the deadlines of the runs ahead of it in its lane (a suffix of them
    gives a weaker bound that still holds); ``shortest_s``: a slot time no run goes under.

    Runs of a lane are dispatched in order, at most one per machine at a time (a user's run
    occupies a session) and each holds it ``shortest_s`` at least, so by a time ``S`` the
    lane's machines can have taken at most ``N(S)`` runs: the count of ``free + k * shortest``
    moments up to ``S``. For the run to go at ``S``, every run ahead still in time at ``S``
    (deadline after ``S``) must have gone first: ``N(S) >= that count + 1``. Both sides only
    change at those moments and at deadlines; the first moment where it holds is the bound.
    """
    if not free_at:
        return math.inf
    if shortest_s <= 0:
        return min(free_at)
    deadlines = sorted(ahead_deadlines)
    moments = [(free, index) for index, free in enumerate(free_at)]
    heapq.heapify(moments)
    taken = 0  # N(S): dispatch moments up to S
    passed = 0  # runs ahead whose deadline is at or before S
    while True:
        next_deadline = deadlines[passed] if passed < len(deadlines) else math.inf
        moment = min(moments[0][0], next_deadline)
        while moments[0][0] <= moment:
            free, index = heapq.heappop(moments)
            heapq.heappush(moments, (free + shortest_s, index))
            taken += 1
        passed = bisect.bisect_right(deadlines, moment, lo=passed)
        if taken >= len(deadlines) - passed + 1:
            return moment


def misses_for_sure(
    run: QueuedRun,
    connection: Connection,
    *,
    ahead_deadlines: Sequence[float],
    views: Sequence[MachineView],
    model: ServiceModel,
    now: float,
    occupants: Mapping[str, Occupant] | None = None,
    policy: FailEarlyPolicy = FailEarlyPolicy(),
) -> bool:
    """The fail-early rule by the lane bound alone: for a run too deep in its queue to play
    forward (its lane rank and the deadlines ahead of it are cheap to read).

    ``ahead_deadlines``: the deadlines of the runs ahead of it in its lane (or the last of them).
    """
    if run.queue_deadline is None or model.samples(connection.kind, now) < policy.min_samples:
        return False
    bound = _lane_bound(
        run, connection, ahead_deadlines=ahead_deadlines, views=views, model=model, now=now,
        occupants=occupants, policy=policy,
    )  # fmt: skip
    # No machine can take it (inf): never certain, a session may open, a machine come back.
    return not math.isinf(bound) and bound > run.queue_deadline + policy.margin_s


def _lane_bound(
    run: QueuedRun,
    connection: Connection,
    *,
    ahead_deadlines: Sequence[float],
    views: Sequence[MachineView],
    model: ServiceModel,
    now: float,
    occupants: Mapping[str, Occupant] | None,
    policy: FailEarlyPolicy,
) -> float:
    shortest = model.estimate(connection.kind, None, now).low(policy.quantile)
    free_at = lane_free_at(
        views, connection, run.mode, model, now, quantile=policy.quantile, occupants=occupants
    )
    return earliest_dispatch(free_at, ahead_deadlines, shortest)


def predicted_misses(
    queued: Sequence[QueuedRun],
    views: Sequence[MachineView],
    connections: Mapping[str, Connection],
    model: ServiceModel,
    now: float,
    *,
    occupants: Mapping[str, Occupant] | None = None,
    predictions: Sequence[Prediction] | None = None,
    policy: FailEarlyPolicy = FailEarlyPolicy(),
    seed: int = 0,
) -> list[Miss]:
    """The runs of ``queued`` predicted to miss their deadline, in queue order, each with the
    fail-early verdict (see the module docstring). ``predictions``, when given, are those of
    ``predict_starts`` for the same arguments (saves playing the queue again)."""
    if predictions is None:
        predictions = predict_starts(
            queued, views, connections, model, now, occupants=occupants, seed=seed
        )
    optimistic: dict[str, Prediction] | None = None
    ahead: dict[str, list[float]] = {}  # lane -> deadlines of the runs seen so far
    misses: list[Miss] = []
    for run, prediction in zip(queued, predictions, strict=True):
        lane_deadlines = ahead.setdefault(lane_of(run.connection_id, run.mode, run.priority), [])
        connection = connections.get(run.connection_id)
        if prediction.outlook is not Outlook.starts:
            miss = Miss(
                run.run_id, run.queue_deadline, prediction.outlook, prediction.confidence,
                certain=False, fail_early=False,
            )  # fmt: skip
            if (
                prediction.outlook is Outlook.times_out
                and connection is not None
                and run.queue_deadline is not None
                and model.samples(connection.kind, now) >= policy.min_samples
            ):
                if optimistic is None:
                    played = predict_starts(
                        queued, views, connections, model, now, occupants=occupants,
                        optimistic=True, quantile=policy.quantile, slack_s=policy.margin_s,
                        seed=seed,
                    )  # fmt: skip
                    optimistic = {p.run_id: p for p in played}
                bound = _lane_bound(
                    run, connection, ahead_deadlines=lane_deadlines, views=views, model=model,
                    now=now, occupants=occupants, policy=policy,
                )  # fmt: skip
                certain = optimistic[run.run_id].outlook is not Outlook.starts or (
                    bound > run.queue_deadline + policy.margin_s
                )
                miss = replace(
                    miss, certain=certain, fail_early=certain and run.fail_early, bound_at=bound
                )
            misses.append(miss)
        lane_deadlines.append(math.inf if run.queue_deadline is None else run.queue_deadline)
    return misses
