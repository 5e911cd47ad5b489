"""Queue and machine gauges, read from Redis as a snapshot and served whole.

Queue and machine gauges are not counted in process memory: the dispatcher reads them from Redis
into a :class:`QueueStateSnapshot` and hands it to :meth:`DispatcherMetrics.set_queue_state`,
which swaps it in whole (a scrape sees one snapshot or the next, never a mix, and a target that
left the snapshot leaves ``/metrics``). Every replica exports the same values, so dashboards and
alerts aggregate these gauges with ``max``, never ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.metrics.specs import (
    MACHINE_STATES,
    MACHINES,
    NEXT_DEADLINE,
    OLDEST,
    OLDEST_SIGN_IN,
    PREDICTED_TIMEOUTS,
    PRIORITIES,
    QUEUED,
    SLOTS,
    STATE_TIME,
    WAIT_REASONS,
    WAITING,
    MetricSpec,
    closed_value,
    fleet_value,
)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One (target, priority) queue: how many runs wait, and since when the oldest one."""

    depth: int
    oldest_enqueued_at: float | None = None  # Unix time; None when the queue is empty


@dataclass(frozen=True, slots=True)
class SlotCounts:
    """Unattended slots of a group's online machines (group ``none``: ungrouped machines)."""

    busy: int
    free: int


@dataclass(frozen=True, slots=True)
class QueueStateSnapshot:
    """Queue and machine state read from Redis at ``now`` (Unix time).

    A target, group or label set left out is dropped from ``/metrics``; give a zero to export
    an explicit zero. Keys are queue keys (``g:finance``, ``m:m1``), group ids or ``none``.
    """

    now: float
    queues: Mapping[tuple[str, str], QueueStats] = field(default_factory=dict)
    waiting: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, reason)
    oldest_sign_in_enqueued_at: Mapping[str, float] = field(default_factory=dict)  # target
    # The forecast chore's outlook per target: earliest queue deadline (Unix time), and how
    # many queued runs it predicts to miss theirs.
    next_deadline_at: Mapping[str, float] = field(default_factory=dict)  # target
    predicted_timeouts: Mapping[str, int] = field(default_factory=dict)  # target
    machines: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (group, state)
    slots: Mapping[str, SlotCounts] = field(default_factory=dict)  # group
    # (target, connection kind, mode) of every run the fleet's connections can queue: their
    # time-out counters are exported at 0 by every replica (see set_queue_state).
    run_labels: frozenset[tuple[str, str, str]] = frozenset()


def _family(spec: MetricSpec, values: Mapping[tuple[str, ...], float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(spec.name, spec.help, labels=tuple(spec.labels))
    for labels, value in sorted(values.items()):
        family.add_metric(list(labels), value)
    return family


def _add(into: dict[tuple[str, ...], float], key: tuple[str, ...], value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def _keep_max(into: dict[tuple[str, ...], float], key: tuple[str, ...], value: float) -> None:
    into[key] = max(into.get(key, value), value)


def render_queue_state(snapshot: QueueStateSnapshot | None) -> tuple[GaugeMetricFamily, ...]:
    """The queue-state gauge families of a snapshot (empty families for ``None``)."""
    depth: dict[tuple[str, ...], float] = {}
    oldest: dict[tuple[str, ...], float] = {}
    sign_in: dict[tuple[str, ...], float] = {}
    waiting: dict[tuple[str, ...], float] = {}
    deadline: dict[tuple[str, ...], float] = {}
    misses: dict[tuple[str, ...], float] = {}
    machines: dict[tuple[str, ...], float] = {}
    slots: dict[tuple[str, ...], float] = {}
    stamp: dict[tuple[str, ...], float] = {}
    if snapshot is not None:
        now = snapshot.now
        stamp[()] = now
        for (target, priority), stats in snapshot.queues.items():
            key = (fleet_value(target), closed_value(priority, PRIORITIES))
            _add(depth, key, stats.depth)
            if stats.depth > 0 and stats.oldest_enqueued_at is not None:
                _keep_max(oldest, key, max(0.0, now - stats.oldest_enqueued_at))
        for target, enqueued_at in snapshot.oldest_sign_in_enqueued_at.items():
            _keep_max(sign_in, (fleet_value(target),), max(0.0, now - enqueued_at))
        for target, deadline_at in snapshot.next_deadline_at.items():
            left = deadline_at - now
            one = (fleet_value(target),)
            deadline[one] = min(deadline.get(one, left), left)
        for target, count in snapshot.predicted_timeouts.items():
            _add(misses, (fleet_value(target),), count)
        for (target, reason), count in snapshot.waiting.items():
            _add(waiting, (fleet_value(target), closed_value(reason, WAIT_REASONS)), count)
        for (group, state), count in snapshot.machines.items():
            _add(machines, (fleet_value(group), closed_value(state, MACHINE_STATES)), count)
        for group, counts in snapshot.slots.items():
            _add(slots, (fleet_value(group), "busy"), counts.busy)
            _add(slots, (fleet_value(group), "free"), counts.free)
    return (
        _family(QUEUED, depth),
        _family(OLDEST, oldest),
        _family(OLDEST_SIGN_IN, sign_in),
        _family(NEXT_DEADLINE, deadline),
        _family(PREDICTED_TIMEOUTS, misses),
        _family(WAITING, waiting),
        _family(MACHINES, machines),
        _family(SLOTS, slots),
        _family(STATE_TIME, stamp),
    )


class QueueStateCollector(Collector):
    """Serves the last snapshot's families; replacing them is one reference swap."""

    def __init__(self) -> None:
        self._families = render_queue_state(None)

    def replace(self, snapshot: QueueStateSnapshot) -> None:
        self._families = render_queue_state(snapshot)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return render_queue_state(None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._families
