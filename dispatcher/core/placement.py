"""Placement planning (SPEC §3, queue order and skip-ahead): which lane head goes to which
machine in one pass over a target, and why the others wait. No I/O.

The runs of a target that share connection, mode and priority (a lane, see ``lane_of``) are
eligible for exactly the same machines, so a pass looks at lane heads only, in queue order
(the order score, then the run id). A head that cannot be placed is skipped, so it never
blocks the lanes behind it, and its reasons are kept per machine. Each placement is applied
to a local copy of the machines' state, so later decisions in the pass see it. Cost: lanes x
machines of the target, independent of the backlog and of the fleet.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from dispatcher.codes import ErrorCode
from dispatcher.core.selection import Selection, placement_room, select_machine
from dispatcher.models import AssignedRun, Connection, MachineView, Mode, QueuedHead

# A pass reads at most this many runs of a lane, and places at most MAX_PLACEMENTS runs.
PREFETCH_PER_LANE = 50
MAX_PLACEMENTS = 200

# Lane -> (its head run, why that run cannot be placed, per machine).
Waiting = dict[str, tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class Placement:
    """A lane head the pass decided to place on ``view``'s machine."""

    head: QueuedHead
    connection: Connection
    view: MachineView


@dataclass(frozen=True)
class Plan:
    """What one pass decided: the placements in queue order, the lanes whose head waits
    (with the reasons), and ``again``: whether another pass may place more runs (a lane had
    more runs than were read, or the pass stopped at ``MAX_PLACEMENTS``)."""

    placements: list[Placement] = field(default_factory=list)
    waiting: Waiting = field(default_factory=dict)
    again: bool = False


def runs_per_lane(views: Iterable[MachineView]) -> int:
    """How many runs of each lane a pass needs to read: no more than the machines could take
    (at least the head, whose reasons are recorded when it waits)."""
    return max(1, min(PREFETCH_PER_LANE, placement_room(views)))


def plan_pass(
    connections: Mapping[str, Connection],
    lanes: Mapping[str, list[QueuedHead]],
    views: Mapping[str, MachineView],
    *,
    per_lane: int = PREFETCH_PER_LANE,
    max_placements: int = MAX_PLACEMENTS,
    rng: random.Random | None = None,
    heads_only: Collection[str] = (),
) -> Plan:
    """Walk the lane heads in queue order, placing each on the local state if it fits.

    ``lanes``: the first runs of each lane (at most ``per_lane``; only the head of the lanes
    in ``heads_only``), in lane order; ``views``: the target's machines by id. Neither is
    changed.
    """
    state = dict(views)
    heap = [(members[0].score, members[0].run_id, lane, 0) for lane, members in lanes.items()]
    heapq.heapify(heap)
    plan = Plan()
    again = False
    while heap and len(plan.placements) < max_placements:
        _, _, lane, index = heapq.heappop(heap)
        head = lanes[lane][index]
        connection = connections.get(head.connection_id)
        if connection is None:
            continue  # deleted meanwhile: the run waits for its deadline
        mode = Mode(head.mode)
        selection = select_machine(state.values(), connection, mode, rng)
        if selection.machine_id is None:
            plan.waiting[lane] = (head.run_id, waiting_reasons(selection, state))
            continue
        view = state[selection.machine_id]
        plan.placements.append(Placement(head, connection, view))
        occupied = AssignedRun(
            run_id=head.run_id, mode=mode, user=connection.session_user.casefold(), fence=0
        )
        state[view.machine_id] = view.model_copy(update={"assigned": (*view.assigned, occupied)})
        if index + 1 < len(lanes[lane]):
            following = lanes[lane][index + 1]
            heapq.heappush(heap, (following.score, following.run_id, lane, index + 1))
        elif len(lanes[lane]) == (1 if lane in heads_only else per_lane):
            again = True  # the lane may have more runs than were read
    return Plan(plan.placements, plan.waiting, again or bool(heap))


def waiting_reasons(selection: Selection, views: Mapping[str, MachineView]) -> dict[str, str]:
    """Why each machine cannot take the run, as shown to people (an offline machine says
    since when)."""
    reasons: dict[str, str] = {}
    for machine_id, code in selection.reasons.items():
        view = views.get(machine_id)
        if code is ErrorCode.MachineOffline and view is not None:
            since = view.offline_since
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
            reasons[machine_id] = (
                f"MachineOffline since {stamp}" if stamp else "MachineOffline (never seen)"
            )
        else:
            reasons[machine_id] = code.value
    return reasons


def reasons_payload(raw: Mapping[str, object] | None) -> dict[str, str]:
    """The per-machine reasons stored for a lane (empty when none were recorded)."""
    if not raw:
        return {}
    machines = raw.get("machines") or {}
    if not isinstance(machines, Mapping):
        return {}
    return {str(k): str(v) for k, v in machines.items()}
