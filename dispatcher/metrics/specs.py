"""What the dispatcher and the workers export: every metric's name, type, help, labels with
their bounds, and the label values the typed methods fold into closed vocabularies.

Every name starts with ``rundispatch_`` and ends with its unit: ``_total`` for counters,
``_seconds`` or ``_bytes`` for measures, a plural noun (``_runs``, ``_machines``, ``_slots``,
``_events``) for counts held in gauges, ``_info`` for constant-1 gauges whose labels describe the
process, and ``_up`` for a 0/1 state.

Labels never carry unbounded values. :data:`DISPATCHER_SPECS` and :data:`WORKER_SPECS` declare,
per metric, each label's closed vocabulary or its bound (one value per target or group of the
fleet, or one value per process). The typed methods fold any value outside a closed vocabulary
into ``"other"``, so a caller's mistake cannot open a new series per run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
    "delivery_limit", "heartbeat", "unknown_run", "handoff", "sender",
)  # fmt: skip
REFUSAL_REASONS: Final = _closed("key_mismatch", "sender")
EVENTS: Final = _closed(
    "queued", "dispatched", "started", "succeeded", "failed", "timed_out", "cancelled", "rejected"
)
MACHINE_STATES: Final = _closed("online", "offline", "maintenance")
SLOT_STATES: Final = _closed("busy", "free")
WORKER_OUTCOMES: Final = _closed("succeeded", "failed", "cancelled")
EXECUTOR_ERRORS: Final = _closed(
    "start_failed", "crashed", "timeout", "bad_output", "unreachable", "handoff_refused"
)

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
REFUSED = MetricSpec(
    "rundispatch_refused_messages_total", "counter",
    "Messages refused because of who sent them (a machine's key that is not the pinned one, a "
    "sender that may not speak for the machine or owner it names), by reason.",
    {"reason": REFUSAL_REASONS},
)  # fmt: skip
EVENTS_PUBLISHED = MetricSpec(
    "rundispatch_events_published_total", "counter", "Run status events published.",
    {"event": EVENTS},
)  # fmt: skip
OUTBOX = MetricSpec(
    "rundispatch_outbox_backlog_events", "gauge", "Events recorded but not yet published."
)
UP = MetricSpec("rundispatch_up", "gauge", "1 while the dispatcher consumes and dispatches.")
STORE_OUTAGE = MetricSpec(
    "rundispatch_store_outage_seconds", "gauge",
    "How long this dispatcher has been holding deliveries that Redis or RabbitMQ cannot serve "
    "(0: no outage).",
)  # fmt: skip
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
NEXT_DEADLINE = MetricSpec(
    "rundispatch_queue_next_deadline_seconds", "gauge",
    "Seconds until the earliest queue deadline of the target's queued runs (any connection kind).",
    {"target": Bound.fleet},
)  # fmt: skip
PREDICTED_TIMEOUTS = MetricSpec(
    "rundispatch_queue_predicted_timeouts", "gauge",
    "Queued runs of the target the forecast predicts to miss their queue deadline.",
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

QUEUE_STATE_SPECS: Final = (
    QUEUED, OLDEST, OLDEST_SIGN_IN, NEXT_DEADLINE, PREDICTED_TIMEOUTS, WAITING, MACHINES, SLOTS,
    STATE_TIME,
)  # fmt: skip
DISPATCHER_SPECS: Final = (
    SUBMITTED, REJECTED, DISPATCHED, COMPLETED, TIMED_OUT, QUEUE_WAIT, RUN_DURATION, DECISION,
    REFRESHES, REFRESH_TIME, DEAD_LETTERS, REFUSED, EVENTS_PUBLISHED, OUTBOX, UP, STORE_OUTAGE,
    BUILD,
    *QUEUE_STATE_SPECS,
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


def closed_value(value: str | None, vocabulary: frozenset[str]) -> str:
    if value is None:
        return NONE if NONE in vocabulary else OTHER
    value = str(value)
    return value if value in vocabulary else OTHER


def fleet_value(value: str | None) -> str:
    """A target key or group id; anything that cannot be one becomes ``other``."""
    if not value:
        return NONE
    return value if _FLEET_ID.match(value) else OTHER


def run_labels(target: str | None, kind: str | None, mode: str | None) -> tuple[str, str, str]:
    return fleet_value(target), closed_value(kind, KINDS), closed_value(mode, MODES)


def counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.name, spec.help, tuple(spec.labels), registry=registry)


def gauge(spec: MetricSpec, registry: CollectorRegistry) -> Gauge:
    return Gauge(spec.name, spec.help, tuple(spec.labels), registry=registry)


def histogram(spec: MetricSpec, registry: CollectorRegistry) -> Histogram:
    return Histogram(
        spec.name, spec.help, tuple(spec.labels), registry=registry, buckets=spec.buckets
    )
