"""A model of placement through time, shared by the start-time forecast and the capacity replay.

It holds what a placement pass holds, the queued runs by lane and the machines' views, and
lets time move: a placed run occupies its machine until the end time its caller gives. A pass
places lane heads in queue order through ``select_machine``, as ``Placer._decide`` does: a head
that no machine can take is skipped and its lane waits (runs of a lane are eligible for the same
machines), a placed head makes way for the next run of its lane, and each placement is applied
to the views before the next decision. The placer caps a pass at 200 claims and reads a bounded
number of runs per lane, then asks for another pass: here one pass goes on until nothing more
fits, which places the same runs on the same machines.

Ties between equally loaded machines are broken by the random generator the caller gives, so a
replay with a seeded generator is reproducible.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.core.selection import select_machine
from dispatcher.models import AssignedRun, Connection, MachineView, Mode, Priority


@dataclass(frozen=True, slots=True)
class Waiting:
    """A queued run as placement sees it: its lane and its place in the target's order."""

    run_id: str
    connection_id: str
    mode: Mode
    priority: Priority
    score: float

    @property
    def lane(self) -> str:
        return lane_of(self.connection_id, self.mode.value, self.priority.value)

    @property
    def order(self) -> tuple[float, str]:
        return (self.score, self.run_id)  # a Redis sorted set's order: score, then member


class Lanes:
    """The queued runs of one target, per lane in queue order; runs can leave from anywhere."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[tuple[float, str], Waiting]]] = {}
        self._queued: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._queued

    def add(self, run: Waiting) -> None:
        self._queued[run.run_id] = run
        heapq.heappush(self._heaps.setdefault(run.lane, []), (run.order, run))

    def remove(self, run_id: str) -> Waiting | None:
        """Take a run out (time-out, cancel); its heap entry is dropped when it surfaces."""
        return self._queued.pop(run_id, None)

    def head(self, lane: str) -> Waiting | None:
        heap = self._heaps.get(lane)
        while heap:
            run = heap[0][1]
            if self._queued.get(run.run_id) is run:
                return run
            heapq.heappop(heap)
        if heap is not None:
            del self._heaps[lane]
        return None

    def heads(self) -> list[Waiting]:
        return [run for lane in list(self._heaps) if (run := self.head(lane)) is not None]


def occupy(view: MachineView, run_id: str, mode: Mode, user: str) -> MachineView:
    """The view with one more run dispatched to it (the same update the placer applies)."""
    run = AssignedRun(run_id=run_id, mode=mode, user=user.casefold(), fence=0)
    return view.model_copy(update={"assigned": (*view.assigned, run)})


def release(view: MachineView, run_id: str) -> MachineView:
    """The view once ``run_id`` has finished on it."""
    return view.model_copy(
        update={"assigned": tuple(run for run in view.assigned if run.run_id != run_id)}
    )


def idle(view: MachineView) -> MachineView:
    """The view with none of the dispatcher's runs on it: what the machine can take at all."""
    return view.model_copy(update={"assigned": ()}) if view.assigned else view


@dataclass(frozen=True, slots=True)
class Placement:
    run: Waiting
    connection: Connection
    machine_id: str


@dataclass(frozen=True, slots=True)
class Blocked:
    """A lane head no machine can take now, with the reason per machine."""

    run: Waiting
    reasons: Mapping[str, ErrorCode]


def place_pass(
    lanes: Lanes,
    views: dict[str, MachineView],
    connections: Mapping[str, Connection],
    rng: random.Random,
    *,
    only: Collection[str] | None = None,
) -> tuple[list[Placement], list[Blocked]]:
    """Place lane heads in queue order on ``views`` (updated in place) and take them out of
    ``lanes``; return the placements and the heads left waiting, with their reasons.

    ``only``: the machines that freed up or changed since the last pass, when every lane head
    is one that pass left waiting. Those heads could not go anywhere then, and the other
    machines only filled up since, so only these can take them: selecting among them makes
    the same choices (and the same random draws) at a fraction of the cost. Reasons are then
    given for these machines only.
    """
    if only is not None:
        candidates = [views[machine_id] for machine_id in sorted(only) if machine_id in views]
        if not candidates:
            return [], []
    heap = [(run.order, run.lane) for run in lanes.heads()]
    heapq.heapify(heap)
    placed: list[Placement] = []
    blocked: list[Blocked] = []
    while heap:
        _, lane = heapq.heappop(heap)
        run = lanes.head(lane)
        if run is None:
            continue
        connection = connections.get(run.connection_id)
        if connection is None:  # deleted meanwhile: the run waits for its deadline
            blocked.append(Blocked(run, dict.fromkeys(views, ErrorCode.ConnectionNotFound)))
            continue
        pool = views.values() if only is None else [views[v.machine_id] for v in candidates]
        selection = select_machine(pool, connection, run.mode, rng)
        if selection.machine_id is None:
            blocked.append(Blocked(run, selection.reasons))
            continue
        lanes.remove(run.run_id)
        views[selection.machine_id] = occupy(
            views[selection.machine_id], run.run_id, run.mode, connection.session_user
        )
        placed.append(Placement(run, connection, selection.machine_id))
        following = lanes.head(lane)
        if following is not None:
            heapq.heappush(heap, (following.order, lane))
    return placed, blocked


def never_eligible(
    views: Iterable[MachineView], connection: Connection | None, mode: Mode
) -> Mapping[str, ErrorCode] | None:
    """Why no machine could take a run even with all of the dispatcher's runs gone, or None
    when some machine could (once its slots and its user's session free up)."""
    empties = [idle(view) for view in views]
    if connection is None:
        return {view.machine_id: ErrorCode.ConnectionNotFound for view in empties}
    selection = select_machine(empties, connection, mode, random.Random(0))
    return selection.reasons if selection.machine_id is None else None
