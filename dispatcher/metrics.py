"""Prometheus metrics of the dispatcher and the workers, on an injected registry.

Every name starts with ``rundispatch_`` and ends with its unit: ``_total`` for counters,
``_seconds`` or ``_bytes`` for measures, a plural noun (``_runs``, ``_machines``, ``_slots``,
``_events``) for counts held in gauges, ``_info`` for constant-1 gauges whose labels describe the
process, and ``_up`` for a 0/1 state.

Labels never carry unbounded values. :data:`DISPATCHER_SPECS` and :data:`WORKER_SPECS` declare,
per metric, each label's closed vocabulary or its bound (one value per target or group of the
fleet, or one value per process). The typed methods fold any value outside a closed vocabulary
into ``"other"``, so a caller's mistake cannot open a new series per run.

Queue and machine gauges are not counted in process memory: the dispatcher reads them from Redis
into a :class:`QueueStateSnapshot` and hands it to :meth:`DispatcherMetrics.set_queue_state`,
which swaps it in whole (a scrape sees one snapshot or the next, never a mix, and a target that
left the snapshot leaves ``/metrics``). Every replica exports the same values, so dashboards and
alerts aggregate these gauges with ``max``, never ``sum``.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher import __version__
from dispatcher.codes import ErrorCode
from dispatcher.models import ConnectionKind, Mode, Priority

OTHER: Final = "other"
NONE: Final = "none"


class Bound(StrEnum):
    """How a label that has no closed vocabulary is still bounded."""

    fleet = "fleet"  # one value per target or group of the fleet file (or "none")
    process = "process"  # set once at start-up: one value per process


Vocabulary = frozenset[str] | Bound


def _closed(*values: str) -> frozenset[str]:
    return frozenset((*values, OTHER))


CODES: Final = _closed(NONE, *ErrorCode)
WAIT_REASONS: Final = _closed(NONE, *ErrorCode)
KINDS: Final = _closed(NONE, *ConnectionKind)
MODES: Final = _closed(NONE, *Mode)
PRIORITIES: Final = _closed(*Priority)
FINAL_STATUSES: Final = _closed("succeeded", "failed", "cancelled", "timed_out")
REFRESH_RESULTS: Final = _closed(
    "success", "permanent_failure", "transient_failure", "misconfigured"
)
DEAD_LETTER_REASONS: Final = _closed(
    "invalid_json", "not_an_object", "schema", "oversize", "content_type", "encoding",
    "delivery_limit", "heartbeat", "unknown_run",
)  # fmt: skip
EVENTS: Final = _closed(
    "queued", "dispatched", "started", "succeeded", "failed", "timed_out", "cancelled", "rejected"
)
MACHINE_STATES: Final = _closed("online", "offline", "maintenance")
SLOT_STATES: Final = _closed("busy", "free")
WORKER_OUTCOMES: Final = _closed("succeeded", "failed", "cancelled")
EXECUTOR_ERRORS: Final = _closed("start_failed", "crashed", "timeout", "bad_output", "unreachable")

QUEUE_WAIT_BUCKETS: Final = (
    0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 2700, 3600, 7200, 14400, 21600,
)  # fmt: skip
RUN_DURATION_BUCKETS: Final = (
    0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
)  # fmt: skip
DECISION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
REFRESH_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its exposed name, type, help text, labels with their bounds, buckets."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: Mapping[str, Vocabulary] = field(default_factory=dict)
    buckets: tuple[float, ...] = ()


_RUN: Final[Mapping[str, Vocabulary]] = {
    "target": Bound.fleet,
    "connection_kind": KINDS,
    "mode": MODES,
}

SUBMITTED = MetricSpec("rundispatch_runs_submitted_total", "counter", "Runs admitted.", _RUN)
REJECTED = MetricSpec(
    "rundispatch_runs_rejected_total", "counter", "Runs rejected at admission, by code.",
    {**_RUN, "code": CODES},
)  # fmt: skip
DISPATCHED = MetricSpec(
    "rundispatch_runs_dispatched_total", "counter", "Runs handed to a machine worker.", _RUN
)
COMPLETED = MetricSpec(
    "rundispatch_runs_completed_total", "counter",
    "Admitted runs that reached a final status, by status and code.",
    {**_RUN, "status": FINAL_STATUSES, "code": CODES},
)  # fmt: skip
TIMED_OUT = MetricSpec(
    "rundispatch_runs_timed_out_total", "counter",
    "Runs whose queue deadline passed before a machine took them.", _RUN,
)  # fmt: skip
QUEUE_WAIT = MetricSpec(
    "rundispatch_queue_wait_seconds", "histogram", "Time from submission to dispatch.",
    {"target": Bound.fleet, "connection_kind": KINDS}, QUEUE_WAIT_BUCKETS,
)  # fmt: skip
RUN_DURATION = MetricSpec(
    "rundispatch_run_duration_seconds", "histogram", "Time from start to end of runs that started.",
    {"target": Bound.fleet, "status": FINAL_STATUSES}, RUN_DURATION_BUCKETS,
)  # fmt: skip
DECISION = MetricSpec(
    "rundispatch_dispatch_decision_seconds", "histogram",
    "Time to decide whether and where a run goes.", {}, DECISION_BUCKETS,
)  # fmt: skip
REFRESHES = MetricSpec(
    "rundispatch_token_refreshes_total", "counter", "Sign-in token refreshes, by result.",
    {"result": REFRESH_RESULTS},
)  # fmt: skip
REFRESH_TIME = MetricSpec(
    "rundispatch_token_refresh_seconds", "histogram", "Time a token refresh took, by result.",
    {"result": REFRESH_RESULTS}, REFRESH_BUCKETS,
)  # fmt: skip
DEAD_LETTERS = MetricSpec(
    "rundispatch_dead_letters_total", "counter", "Messages dead-lettered, by reason class.",
    {"reason": DEAD_LETTER_REASONS},
)  # fmt: skip
EVENTS_PUBLISHED = MetricSpec(
    "rundispatch_events_published_total", "counter", "Run status events published.",
    {"event": EVENTS},
)  # fmt: skip
OUTBOX = MetricSpec(
    "rundispatch_outbox_backlog_events", "gauge", "Events recorded but not yet published."
)
UP = MetricSpec("rundispatch_up", "gauge", "1 while the dispatcher consumes and dispatches.")
BUILD = MetricSpec(
    "rundispatch_build_info", "gauge", "Always 1; the labels say which build runs.",
    {"version": Bound.process, "python": Bound.process},
)  # fmt: skip
QUEUED = MetricSpec(
    "rundispatch_queued_runs", "gauge", "Runs waiting in a target's queue (from Redis).",
    {"target": Bound.fleet, "priority": PRIORITIES},
)  # fmt: skip
OLDEST = MetricSpec(
    "rundispatch_queue_oldest_age_seconds", "gauge", "Age of the oldest queued run (from Redis).",
    {"target": Bound.fleet, "priority": PRIORITIES},
)  # fmt: skip
OLDEST_SIGN_IN = MetricSpec(
    "rundispatch_queue_oldest_sign_in_age_seconds", "gauge",
    "Age of the oldest queued run of a sign-in connection (limit: 1 h).",
    {"target": Bound.fleet},
)  # fmt: skip
WAITING = MetricSpec(
    "rundispatch_queue_waiting_runs", "gauge", "Queued runs by the reason they wait.",
    {"target": Bound.fleet, "reason": WAIT_REASONS},
)  # fmt: skip
MACHINES = MetricSpec(
    "rundispatch_machines", "gauge", "Machines per group and state (group none: ungrouped).",
    {"group": Bound.fleet, "state": MACHINE_STATES},
)  # fmt: skip
SLOTS = MetricSpec(
    "rundispatch_unattended_slots", "gauge", "Unattended slots of online machines per group.",
    {"group": Bound.fleet, "state": SLOT_STATES},
)  # fmt: skip
STATE_TIME = MetricSpec(
    "rundispatch_queue_state_timestamp_seconds", "gauge",
    "When the queue-state gauges were read from Redis (Unix time).",
)  # fmt: skip

QUEUE_STATE_SPECS: Final = (QUEUED, OLDEST, OLDEST_SIGN_IN, WAITING, MACHINES, SLOTS, STATE_TIME)
DISPATCHER_SPECS: Final = (
    SUBMITTED, REJECTED, DISPATCHED, COMPLETED, TIMED_OUT, QUEUE_WAIT, RUN_DURATION, DECISION,
    REFRESHES, REFRESH_TIME, DEAD_LETTERS, EVENTS_PUBLISHED, OUTBOX, UP, BUILD, *QUEUE_STATE_SPECS,
)  # fmt: skip

W_RUNS = MetricSpec(
    "rundispatch_worker_runs_total", "counter", "Runs this worker executed, by outcome and code.",
    {"outcome": WORKER_OUTCOMES, "code": CODES},
)  # fmt: skip
W_DURATION = MetricSpec(
    "rundispatch_worker_run_duration_seconds", "histogram", "Time this worker spent on a run.",
    {"outcome": WORKER_OUTCOMES}, RUN_DURATION_BUCKETS,
)  # fmt: skip
W_HEARTBEATS = MetricSpec("rundispatch_worker_heartbeats_total", "counter", "Heartbeats sent.")
W_HEARTBEAT_FAILURES = MetricSpec(
    "rundispatch_worker_heartbeat_failures_total", "counter", "Heartbeats that could not be sent."
)
W_RUNNING = MetricSpec("rundispatch_worker_running_runs", "gauge", "Runs executing right now.")
W_EXECUTOR_ERRORS = MetricSpec(
    "rundispatch_worker_executor_errors_total", "counter", "Executor errors, by reason class.",
    {"reason": EXECUTOR_ERRORS},
)  # fmt: skip
W_BUILD = MetricSpec(
    "rundispatch_worker_build_info", "gauge", "Always 1; the labels say which build runs.",
    {"version": Bound.process, "python": Bound.process, "executor": Bound.process},
)  # fmt: skip
WORKER_SPECS: Final = (
    W_RUNS, W_DURATION, W_HEARTBEATS, W_HEARTBEAT_FAILURES, W_RUNNING, W_EXECUTOR_ERRORS, W_BUILD,
)  # fmt: skip


def label_values_bounded() -> dict[str, Mapping[str, Vocabulary]]:
    """Per metric name, each label's closed vocabulary or its :class:`Bound`."""
    return {spec.name: spec.labels for spec in (*DISPATCHER_SPECS, *WORKER_SPECS)}


# ---- label values ---------------------------------------------------------------------------

_FLEET_ID = re.compile(r"^(?:[mg]:)?[A-Za-z0-9_.:@\-]{1,128}$")


def _closed_value(value: str | None, vocabulary: frozenset[str]) -> str:
    if value is None:
        return NONE if NONE in vocabulary else OTHER
    value = str(value)
    return value if value in vocabulary else OTHER


def _fleet_value(value: str | None) -> str:
    """A target key or group id; anything that cannot be one becomes ``other``."""
    if not value:
        return NONE
    return value if _FLEET_ID.match(value) else OTHER


def _run_labels(target: str | None, kind: str | None, mode: str | None) -> tuple[str, str, str]:
    return _fleet_value(target), _closed_value(kind, KINDS), _closed_value(mode, MODES)


def _counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.name, spec.help, tuple(spec.labels), registry=registry)


def _gauge(spec: MetricSpec, registry: CollectorRegistry) -> Gauge:
    return Gauge(spec.name, spec.help, tuple(spec.labels), registry=registry)


def _histogram(spec: MetricSpec, registry: CollectorRegistry) -> Histogram:
    return Histogram(
        spec.name, spec.help, tuple(spec.labels), registry=registry, buckets=spec.buckets
    )


# ---- queue state ----------------------------------------------------------------------------


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
    machines: dict[tuple[str, ...], float] = {}
    slots: dict[tuple[str, ...], float] = {}
    stamp: dict[tuple[str, ...], float] = {}
    if snapshot is not None:
        now = snapshot.now
        stamp[()] = now
        for (target, priority), stats in snapshot.queues.items():
            key = (_fleet_value(target), _closed_value(priority, PRIORITIES))
            _add(depth, key, stats.depth)
            if stats.depth > 0 and stats.oldest_enqueued_at is not None:
                _keep_max(oldest, key, max(0.0, now - stats.oldest_enqueued_at))
        for target, enqueued_at in snapshot.oldest_sign_in_enqueued_at.items():
            _keep_max(sign_in, (_fleet_value(target),), max(0.0, now - enqueued_at))
        for (target, reason), count in snapshot.waiting.items():
            _add(waiting, (_fleet_value(target), _closed_value(reason, WAIT_REASONS)), count)
        for (group, state), count in snapshot.machines.items():
            _add(machines, (_fleet_value(group), _closed_value(state, MACHINE_STATES)), count)
        for group, counts in snapshot.slots.items():
            _add(slots, (_fleet_value(group), "busy"), counts.busy)
            _add(slots, (_fleet_value(group), "free"), counts.free)
    return (
        _family(QUEUED, depth),
        _family(OLDEST, oldest),
        _family(OLDEST_SIGN_IN, sign_in),
        _family(WAITING, waiting),
        _family(MACHINES, machines),
        _family(SLOTS, slots),
        _family(STATE_TIME, stamp),
    )


class _QueueStateCollector(Collector):
    """Serves the last snapshot's families; replacing them is one reference swap."""

    def __init__(self) -> None:
        self._families = render_queue_state(None)

    def replace(self, snapshot: QueueStateSnapshot) -> None:
        self._families = render_queue_state(snapshot)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return render_queue_state(None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._families


# ---- the dispatcher -------------------------------------------------------------------------


class DispatcherMetrics:
    """The dispatcher's metrics; every method is cheap and never raises on odd label values."""

    def __init__(self, registry: CollectorRegistry, version: str = __version__) -> None:
        self._submitted = _counter(SUBMITTED, registry)
        self._rejected = _counter(REJECTED, registry)
        self._dispatched = _counter(DISPATCHED, registry)
        self._completed = _counter(COMPLETED, registry)
        self._timed_out = _counter(TIMED_OUT, registry)
        self._queue_wait = _histogram(QUEUE_WAIT, registry)
        self._run_duration = _histogram(RUN_DURATION, registry)
        self._decision = _histogram(DECISION, registry)
        self._refreshes = _counter(REFRESHES, registry)
        self._refresh_time = _histogram(REFRESH_TIME, registry)
        self._dead_letters = _counter(DEAD_LETTERS, registry)
        self._events = _counter(EVENTS_PUBLISHED, registry)
        self._outbox = _gauge(OUTBOX, registry)
        self._up = _gauge(UP, registry)
        _gauge(BUILD, registry).labels(version, platform.python_version()).set(1)
        self._queue_state = _QueueStateCollector()
        registry.register(self._queue_state)
        # Closed, label-only-by-vocabulary counters start at 0 so that increase() and alerts
        # see their first increment (Prometheus cannot see a counter born at 1).
        for reason in DEAD_LETTER_REASONS - {OTHER}:
            self._dead_letters.labels(reason)
        for result in REFRESH_RESULTS - {OTHER}:
            self._refreshes.labels(result)

    def run_submitted(self, target: str, kind: str, mode: str) -> None:
        """Count a run admitted into ``target``'s queue."""
        labels = _run_labels(target, kind, mode)
        self._submitted.labels(*labels).inc()
        self._timed_out.labels(*labels)  # exported as 0 until a run of this kind times out

    def run_rejected(
        self, target: str | None, kind: str | None, mode: str | None, code: str
    ) -> None:
        """Count a run rejected at admission (target, kind, mode may be unknown: ``None``)."""
        self._rejected.labels(*_run_labels(target, kind, mode), _closed_value(code, CODES)).inc()

    def run_dispatched(self, target: str, kind: str, mode: str) -> None:
        """Count a run handed to a machine worker."""
        self._dispatched.labels(*_run_labels(target, kind, mode)).inc()

    def queue_wait(self, seconds: float, target: str, kind: str) -> None:
        """Observe how long a dispatched run waited since submission."""
        self._queue_wait.labels(_fleet_value(target), _closed_value(kind, KINDS)).observe(seconds)

    def run_completed(
        self,
        target: str,
        kind: str,
        mode: str,
        *,
        status: str,
        code: str | None,
        duration_s: float | None = None,
    ) -> None:
        """Count an admitted run's final status; ``duration_s`` only for runs that started.

        A ``timed_out`` status also counts in ``rundispatch_runs_timed_out_total``.
        """
        labels = _run_labels(target, kind, mode)
        final = _closed_value(status, FINAL_STATUSES)
        self._completed.labels(*labels, final, _closed_value(code, CODES)).inc()
        if final == "timed_out":
            self._timed_out.labels(*labels).inc()
        if duration_s is not None:
            self._run_duration.labels(labels[0], final).observe(duration_s)

    def run_timed_out(self, target: str, kind: str, mode: str) -> None:
        """Count a run whose queue deadline passed (``NoCandidateMachine``)."""
        self.run_completed(
            target, kind, mode, status="timed_out", code=ErrorCode.NoCandidateMachine
        )

    def decision_latency(self, seconds: float) -> None:
        """Observe the time one dispatch decision took."""
        self._decision.observe(seconds)

    def token_refresh(self, result: str, seconds: float) -> None:
        """Count a token refresh by result and observe how long it took."""
        value = _closed_value(result, REFRESH_RESULTS)
        self._refreshes.labels(value).inc()
        self._refresh_time.labels(value).observe(seconds)

    def dead_letter(self, reason_class: str) -> None:
        """Count a dead-lettered message by its reason class (never its free-text reason)."""
        self._dead_letters.labels(_closed_value(reason_class, DEAD_LETTER_REASONS)).inc()

    def event_published(self, event: str, count: int = 1) -> None:
        """Count status events published (``run.queued`` or ``queued``)."""
        self._events.labels(_closed_value(event.removeprefix("run."), EVENTS)).inc(count)

    def set_outbox_backlog(self, events: int) -> None:
        """Set how many events wait in the outbox to be published."""
        self._outbox.set(events)

    def set_up(self, up: bool) -> None:
        """Say whether the dispatcher is consuming and dispatching."""
        self._up.set(1 if up else 0)

    def set_queue_state(self, snapshot: QueueStateSnapshot) -> None:
        """Replace every queue and machine gauge with the snapshot's values, at once.

        Also exports ``rundispatch_runs_timed_out_total`` at 0 for each of the snapshot's
        ``run_labels``: the replica that counts a time-out (the one consuming its event) is not
        always the one that admitted the run, and ``increase()`` cannot see a counter born at 1,
        so without this the time-out alert would miss the first time-out a replica counts.
        """
        for target, kind, mode in snapshot.run_labels:
            self._timed_out.labels(*_run_labels(target, kind, mode))
        self._queue_state.replace(snapshot)


# ---- the worker -----------------------------------------------------------------------------


class WorkerMetrics:
    """A machine worker's metrics (the machine is the scrape target, not a label)."""

    def __init__(
        self, registry: CollectorRegistry, executor: str = "unknown", version: str = __version__
    ) -> None:
        self._runs = _counter(W_RUNS, registry)
        self._duration = _histogram(W_DURATION, registry)
        self._heartbeats = _counter(W_HEARTBEATS, registry)
        self._heartbeat_failures = _counter(W_HEARTBEAT_FAILURES, registry)
        self._running = _gauge(W_RUNNING, registry)
        self._executor_errors = _counter(W_EXECUTOR_ERRORS, registry)
        build = _gauge(W_BUILD, registry)
        build.labels(version, platform.python_version(), executor).set(1)
        for reason in EXECUTOR_ERRORS - {OTHER}:
            self._executor_errors.labels(reason)

    def run_executed(self, outcome: str, duration_s: float, code: str | None = None) -> None:
        """Count a finished run by outcome and code and observe its duration."""
        value = _closed_value(outcome, WORKER_OUTCOMES)
        self._runs.labels(value, _closed_value(code, CODES)).inc()
        self._duration.labels(value).observe(duration_s)

    def heartbeat_sent(self) -> None:
        """Count a heartbeat sent."""
        self._heartbeats.inc()

    def heartbeat_failed(self) -> None:
        """Count a heartbeat that could not be sent."""
        self._heartbeat_failures.inc()

    def set_running_runs(self, count: int) -> None:
        """Set how many runs execute right now."""
        self._running.set(count)

    def executor_error(self, reason: str) -> None:
        """Count an executor error by reason class."""
        self._executor_errors.labels(_closed_value(reason, EXECUTOR_ERRORS)).inc()


# ---- exposition -----------------------------------------------------------------------------


def exported_names(registry: CollectorRegistry) -> frozenset[str]:
    """Every series name the registry can put on ``/metrics``, with type suffixes."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return frozenset(names)


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> int:
    """Serve ``/metrics`` from a daemon thread; return the bound port (``port=0``: any free)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


@contextmanager
def metrics_server(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> Iterator[int]:
    """Like :func:`serve_metrics`, and stop serving on exit (for tests and clean shutdowns)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
