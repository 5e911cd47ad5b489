"""Capacity what-if: replay recorded runs through the placement core on a larger or smaller fleet.

The replay takes the ``core.trace`` records of a window (a run that never held a slot gets the
median slot time of its flow in the trace, else of its kind, else of the whole trace) and plays
every arrival, deadline, cancellation, machine change and slot freed in time order; after each
moment, the targets something happened to get a placement pass (``core.simulation.place_pass``,
the placer's rules), in target order. A slot is free again ``handover_s`` after the run that
held it finished (the time a real pass takes to notice and hand the next run over), which
``estimate_handover`` measures in the trace. A machine whose first recorded change brings it
online, with no run handed to it before, is offline until then (``came_online``). Ties between
machines are broken by a seeded generator, so a replay is reproducible.

Queue wait means time from queued to handed to a machine (the time-out rule's clock); waits are
reported over the runs that were handed over, time-outs separately.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dispatcher.core.ordering import order_score
from dispatcher.core.simulation import Lanes, Waiting, idle, place_pass, release
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.models import Connection, MachineView, RunStatus, Session

DEFAULT_SLOT_TIME_S = 60.0
REPLAYS = 5


@dataclass(frozen=True, slots=True)
class Replayed:
    run_id: str
    outcome: str  # dispatched | timed_out | left (cancelled or failed queued) | queued | skipped
    waited: float | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    machines: int
    runs: int
    dispatched: int
    timed_out: int
    p50_wait_s: float | None
    p95_wait_s: float | None


@dataclass(frozen=True, slots=True)
class CapacityReport:
    target: str
    added: int
    handover_s: float
    recorded: Summary
    today: Summary
    changed: Summary


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _members(views: Iterable[MachineView], target: str) -> list[MachineView]:
    kind, _, target_id = target.partition(":")
    if kind == "m":
        return [view for view in views if view.machine_id == target_id]
    return [view for view in views if view.machine.group_id == target_id]


def resize_fleet(
    views: Sequence[MachineView], target: str, add: int
) -> tuple[list[MachineView], dict[str, str]]:
    """The fleet with ``add`` more machines in group ``target`` (clones of its machines, round
    robin in id order, with their live state), or ``-add`` fewer (the last ones in id order);
    and which machine each clone copies (a clone follows its original's recorded changes)."""
    if add == 0:
        return list(views), {}
    if not target.startswith("g:"):
        raise ValueError(f"machines can only be added to or removed from a group, not {target!r}")
    members = sorted(_members(views, target), key=lambda v: v.machine_id)
    if not members:
        raise ValueError(f"{target!r} has no machines to clone")
    if add < 0:
        gone = {view.machine_id for view in members[len(members) + add :]}
        return [view for view in views if view.machine_id not in gone], {}
    taken = {view.machine_id for view in views}
    clones: list[MachineView] = []
    originals: dict[str, str] = {}
    for index in range(add):
        original = members[index % len(members)]
        copy_id = f"{original.machine_id}-clone{index + 1}"
        while copy_id in taken:
            copy_id += "x"
        taken.add(copy_id)
        originals[copy_id] = original.machine_id
        machine = original.machine.model_copy(update={"machine_id": copy_id, "name": copy_id})
        clones.append(idle(original).model_copy(update={"machine": machine}))
    return [*views, *clones], originals


def estimate_handover(records: Iterable[TraceRecord]) -> float:
    """The median time from a slot freeing to the next hand-off on that machine, among runs
    that were waiting when it freed (0 when the trace shows none)."""
    by_machine: dict[str, list[TraceRecord]] = {}
    for record in records:
        if record.machine_id is not None and record.dispatched_at is not None:
            by_machine.setdefault(record.machine_id, []).append(record)
    gaps: list[float] = []
    for runs in by_machine.values():
        finishes = sorted(r.finished_at for r in runs if r.finished_at is not None)
        for run in runs:
            assert run.dispatched_at is not None
            last = bisect.bisect_right(finishes, run.dispatched_at) - 1
            if last >= 0 and run.queued_at <= finishes[last] < run.dispatched_at:
                gaps.append(run.dispatched_at - finishes[last])
    return statistics.median(gaps) if gaps else 0.0


def came_online(records: Iterable[TraceRecord], changes: Sequence[MachineChange]) -> set[str]:
    """The machines that were offline until their first recorded change: it brings them
    online and no recorded run was handed to them before it (a worker starting up). The
    replay keeps them offline until then instead of taking today's state for all time."""
    first: dict[str, MachineChange] = {}
    for change in changes:
        if change.machine_id not in first or change.at < first[change.machine_id].at:
            first[change.machine_id] = change
    served_before = {
        r.machine_id
        for r in records
        if r.machine_id in first
        and r.dispatched_at is not None
        and r.dispatched_at < first[r.machine_id].at
    }
    return {m for m, change in first.items() if change.online and m not in served_before}


def _slot_times(records: Sequence[TraceRecord]) -> dict[str, float]:
    """Per run, its recorded slot time or the median of its flow's (else kind's, else all)."""
    known = [r for r in records if r.slot_time is not None]
    by_flow: dict[tuple[str, str], list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for r in known:
        assert r.slot_time is not None
        by_flow.setdefault((r.kind.value, r.flow_id), []).append(r.slot_time)
        by_kind.setdefault(r.kind.value, []).append(r.slot_time)
    overall = statistics.median([t for ts in by_kind.values() for t in ts] or [DEFAULT_SLOT_TIME_S])
    times: dict[str, float] = {}
    for r in records:
        if r.slot_time is not None:
            times[r.run_id] = r.slot_time
            continue
        pool = by_flow.get((r.kind.value, r.flow_id)) or by_kind.get(r.kind.value)
        times[r.run_id] = statistics.median(pool) if pool else overall
    return times


_END, _CHANGE, _LEAVE, _DEADLINE, _ARRIVE = range(5)  # at one moment, in this order
_LEFT = frozenset({RunStatus.cancelled, RunStatus.failed})


class _Replay:
    """One replay: the machines, each target's lanes, and the moments still to play."""

    def __init__(
        self,
        records: Sequence[TraceRecord],
        views: Sequence[MachineView],
        connections: Mapping[str, Connection],
        *,
        priority_boost_s: float,
        handover_s: float,
        changes: Sequence[MachineChange],
        clones: Mapping[str, str],
        seed: int,
    ) -> None:
        self.rng = random.Random(seed)
        self.connections = connections
        self.priority_boost_s = priority_boost_s
        self.handover_s = handover_s
        self.changes = changes
        self.machines = {view.machine_id: idle(view) for view in views}
        self.copies: dict[str, list[str]] = {}  # a machine and its clones follow its changes
        for machine_id in self.machines:
            self.copies.setdefault(clones.get(machine_id, machine_id), []).append(machine_id)
        for machine_id in came_online(records, changes):
            for copy_id in self.copies.get(machine_id, ()):
                view = self.machines[copy_id]
                self.machines[copy_id] = view.model_copy(update={"online": False})
        targets = sorted({r.target for r in records})
        self.members = {
            t: [v.machine_id for v in _members(self.machines.values(), t)] for t in targets
        }
        self.serves: dict[str, list[str]] = {}
        for target, ids in self.members.items():
            for machine_id in ids:
                self.serves.setdefault(machine_id, []).append(target)
        self.lanes = {target: Lanes() for target in targets}
        self.slot_time = _slot_times(records)
        self.by_id = {r.run_id: r for r in records}
        self.outcome: dict[str, Replayed] = {}
        self.running: dict[str, str] = {}  # run -> machine
        self.events: list[tuple[float, int, int, str]] = []
        for r in records:
            self.push(r.queued_at, _ARRIVE, r.run_id)
            self.push(r.queue_deadline, _DEADLINE, r.run_id)
            if r.dispatched_at is None and r.finished_at is not None and r.status in _LEFT:
                self.push(r.finished_at, _LEAVE, r.run_id)
        for index, change in enumerate(changes):
            self.push(change.at, _CHANGE, str(index))

    def push(self, at: float, kind: int, key: str) -> None:
        heapq.heappush(self.events, (at, kind, len(self.events), key))

    def run(self) -> dict[str, Replayed]:
        while self.events:
            now = self.events[0][0]
            # Per target: machines freed or changed, and whether a run became a lane head
            # (a head no pass has seen yet needs every machine; see place_pass's ``only``).
            freed: dict[str, set[str]] = {}
            fresh: set[str] = set()
            while self.events and self.events[0][0] == now:
                _, kind, _, key = heapq.heappop(self.events)
                if kind == _END:
                    machine_id = self.running.pop(key)
                    self.machines[machine_id] = release(self.machines[machine_id], key)
                    self._touch(freed, machine_id)
                elif kind == _CHANGE:
                    change = self.changes[int(key)]
                    for machine_id in self.copies.get(change.machine_id, ()):
                        self.machines[machine_id] = _changed(self.machines[machine_id], change)
                        self._touch(freed, machine_id)
                elif kind in (_LEAVE, _DEADLINE):
                    target = self.by_id[key].target
                    if self.lanes[target].remove(key) is not None:
                        left = "left" if kind == _LEAVE else "timed_out"
                        self.outcome[key] = Replayed(key, left)
                elif self._arrive(self.by_id[key], now):
                    fresh.add(self.by_id[key].target)
            for target in sorted(freed.keys() | fresh):
                self._pass(target, now, None if target in fresh else freed[target])
        for run_id in self.by_id:
            self.outcome.setdefault(run_id, Replayed(run_id, "queued"))
        return self.outcome

    def _touch(self, freed: dict[str, set[str]], machine_id: str) -> None:
        for target in self.serves.get(machine_id, ()):
            freed.setdefault(target, set()).add(machine_id)

    def _arrive(self, record: TraceRecord, now: float) -> bool:
        """Queue a run; True when it is the head of its lane (a pass must look at it)."""
        if record.connection_id not in self.connections:
            self.outcome[record.run_id] = Replayed(record.run_id, "skipped")
            return False
        if record.queue_deadline <= now:
            self.outcome[record.run_id] = Replayed(record.run_id, "timed_out")
            return False
        score = record.score
        if score is None:
            score = order_score(record.priority, record.queued_at, self.priority_boost_s)
        waiting = Waiting(record.run_id, record.connection_id, record.mode, record.priority, score)
        lanes = self.lanes[record.target]
        lanes.add(waiting)
        return lanes.head(waiting.lane) is waiting

    def _pass(self, target: str, now: float, only: set[str] | None) -> None:
        if not len(self.lanes[target]):
            return
        local = {m: self.machines[m] for m in self.members[target]}
        placed, _ = place_pass(self.lanes[target], local, self.connections, self.rng, only=only)
        self.machines.update(local)
        for placement in placed:
            run_id = placement.run.run_id
            self.running[run_id] = placement.machine_id
            self.outcome[run_id] = Replayed(
                run_id, "dispatched", now - self.by_id[run_id].queued_at
            )
            self.push(now + self.slot_time[run_id] + self.handover_s, _END, run_id)


def replay(
    records: Sequence[TraceRecord],
    views: Sequence[MachineView],
    connections: Mapping[str, Connection],
    *,
    priority_boost_s: float,
    handover_s: float = 0.0,
    changes: Sequence[MachineChange] = (),
    clones: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Replayed]:
    """Replay ``records`` (any targets) on the machines ``views``; what happens to each run.

    ``clones`` maps a cloned machine to the machine it copies (``resize_fleet``)."""
    return _Replay(
        records, views, connections, priority_boost_s=priority_boost_s, handover_s=handover_s,
        changes=changes, clones=clones or {}, seed=seed,
    ).run()  # fmt: skip


def _changed(view: MachineView, change: MachineChange) -> MachineView:
    machine = view.machine.model_copy(update={"maintenance": change.maintenance})
    sessions = tuple(Session(user=user, state=state) for user, state in change.sessions)
    return view.model_copy(
        update={"machine": machine, "online": change.online, "sessions": sessions}
    )


def summarize(
    records: Iterable[TraceRecord], outcome: Mapping[str, Replayed] | None, machines: int
) -> Summary:
    """Waits and time-outs of ``records``: as recorded (``outcome`` None) or as replayed."""
    waits: list[float] = []
    runs = timed_out = 0
    for record in records:
        runs += 1
        if outcome is None:
            waited, out = record.waited, record.status.value
        else:
            replayed = outcome[record.run_id]
            waited, out = replayed.waited, replayed.outcome
        if waited is not None:
            waits.append(waited)
        elif out == "timed_out":
            timed_out += 1
    return Summary(
        machines, runs, len(waits), timed_out, percentile(waits, 50), percentile(waits, 95)
    )


def what_if(
    records: Sequence[TraceRecord],
    views: Sequence[MachineView],
    connections: Mapping[str, Connection],
    *,
    target: str,
    add_machines: int,
    since: float,
    priority_boost_s: float,
    changes: Sequence[MachineChange] = (),
    handover_s: float | None = None,
    replays: int = REPLAYS,
) -> CapacityReport:
    """Waits and time-outs of ``target``'s runs queued since ``since``: recorded, replayed on
    today's fleet, and replayed with ``add_machines`` more (or fewer) machines in its group.

    ``records`` may hold earlier runs and other targets' runs (a group's machines also serve
    their own queues): they are replayed too, so the window starts with the load it had.
    Each fleet is replayed ``replays`` times with seeds 0, 1, ...: the placer breaks ties
    between equally loaded machines at random, and with several accounts one unlucky draw can
    cost a time-out that another draw avoids, so the replay with the median number of
    time-outs is reported.
    """
    handover = estimate_handover(records) if handover_s is None else handover_s
    resized, clones = resize_fleet(views, target, add_machines)
    shown = [r for r in records if r.target == target and r.queued_at >= since]

    def median_replay(fleet: Sequence[MachineView], copies: Mapping[str, str]) -> Summary:
        count = len(_members(fleet, target))
        summaries = sorted(
            (
                summarize(shown, replay(
                    records, fleet, connections, priority_boost_s=priority_boost_s,
                    handover_s=handover, changes=changes, clones=copies, seed=seed,
                ), count)
                for seed in range(max(1, replays))
            ),
            key=lambda summary: summary.timed_out,
        )  # fmt: skip
        return summaries[(len(summaries) - 1) // 2]

    return CapacityReport(
        target=target,
        added=add_machines,
        handover_s=handover,
        recorded=summarize(shown, None, len(_members(views, target))),
        today=median_replay(views, {}),
        changed=median_replay(resized, clones),
    )
