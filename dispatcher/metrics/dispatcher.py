"""The dispatcher's metrics (see :mod:`~dispatcher.metrics.specs` for names and labels)."""

from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry

from dispatcher import __version__
from dispatcher.codes import ErrorCode
from dispatcher.metrics.queue_state import QueueStateCollector, QueueStateSnapshot
from dispatcher.metrics.specs import (
    BUILD,
    CODES,
    COMPLETED,
    DEAD_LETTER_REASONS,
    DEAD_LETTERS,
    DECISION,
    DISPATCHED,
    EVENTS,
    EVENTS_PUBLISHED,
    FINAL_STATUSES,
    KINDS,
    OTHER,
    OUTBOX,
    QUEUE_WAIT,
    REFRESH_RESULTS,
    REFRESH_TIME,
    REFRESHES,
    REFUSAL_REASONS,
    REFUSED,
    REJECTED,
    RUN_DURATION,
    STORE_OUTAGE,
    SUBMITTED,
    TIMED_OUT,
    UP,
    closed_value,
    counter,
    fleet_value,
    gauge,
    histogram,
    run_labels,
)


class DispatcherMetrics:
    """The dispatcher's metrics; every method is cheap and never raises on odd label values."""

    def __init__(self, registry: CollectorRegistry, version: str = __version__) -> None:
        self._submitted = counter(SUBMITTED, registry)
        self._rejected = counter(REJECTED, registry)
        self._dispatched = counter(DISPATCHED, registry)
        self._completed = counter(COMPLETED, registry)
        self._timed_out = counter(TIMED_OUT, registry)
        self._queue_wait = histogram(QUEUE_WAIT, registry)
        self._run_duration = histogram(RUN_DURATION, registry)
        self._decision = histogram(DECISION, registry)
        self._refreshes = counter(REFRESHES, registry)
        self._refresh_time = histogram(REFRESH_TIME, registry)
        self._dead_letters = counter(DEAD_LETTERS, registry)
        self._refused = counter(REFUSED, registry)
        self._events = counter(EVENTS_PUBLISHED, registry)
        self._outbox = gauge(OUTBOX, registry)
        self._up = gauge(UP, registry)
        self._outage_since: float | None = None
        gauge(STORE_OUTAGE, registry).set_function(self._outage_s)
        gauge(BUILD, registry).labels(version, platform.python_version()).set(1)
        self._queue_state = QueueStateCollector()
        registry.register(self._queue_state)
        # Closed, label-only-by-vocabulary counters start at 0 so that increase() and alerts
        # see their first increment (Prometheus cannot see a counter born at 1).
        for reason in DEAD_LETTER_REASONS - {OTHER}:
            self._dead_letters.labels(reason)
        for result in REFRESH_RESULTS - {OTHER}:
            self._refreshes.labels(result)
        for reason in REFUSAL_REASONS - {OTHER}:
            self._refused.labels(reason)

    def run_submitted(self, target: str, kind: str, mode: str) -> None:
        """Count a run admitted into ``target``'s queue."""
        labels = run_labels(target, kind, mode)
        self._submitted.labels(*labels).inc()
        self._timed_out.labels(*labels)  # exported as 0 until a run of this kind times out

    def run_rejected(
        self, target: str | None, kind: str | None, mode: str | None, code: str
    ) -> None:
        """Count a run rejected at admission (target, kind, mode may be unknown: ``None``)."""
        self._rejected.labels(*run_labels(target, kind, mode), closed_value(code, CODES)).inc()

    def run_dispatched(self, target: str, kind: str, mode: str) -> None:
        """Count a run handed to a machine worker."""
        self._dispatched.labels(*run_labels(target, kind, mode)).inc()

    def queue_wait(self, seconds: float, target: str, kind: str) -> None:
        """Observe how long a dispatched run waited since submission."""
        self._queue_wait.labels(fleet_value(target), closed_value(kind, KINDS)).observe(seconds)

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
        labels = run_labels(target, kind, mode)
        final = closed_value(status, FINAL_STATUSES)
        self._completed.labels(*labels, final, closed_value(code, CODES)).inc()
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
        value = closed_value(result, REFRESH_RESULTS)
        self._refreshes.labels(value).inc()
        self._refresh_time.labels(value).observe(seconds)

    def message_refused(self, reason: str) -> None:
        """Count a message refused because of its sender (see ``REFUSAL_REASONS``)."""
        self._refused.labels(closed_value(reason, REFUSAL_REASONS)).inc()

    def dead_letter(self, reason_class: str) -> None:
        """Count a dead-lettered message by its reason class (never its free-text reason)."""
        self._dead_letters.labels(closed_value(reason_class, DEAD_LETTER_REASONS)).inc()

    def event_published(self, event: str, count: int = 1) -> None:
        """Count status events published (``run.queued`` or ``queued``)."""
        self._events.labels(closed_value(event.removeprefix("run."), EVENTS)).inc(count)

    def set_outbox_backlog(self, events: int) -> None:
        """Set how many events wait in the outbox to be published."""
        self._outbox.set(events)

    def set_store_outage(self, holding: bool) -> None:
        """Say whether deliveries are held because a service cannot serve them (the gauge
        reads how long they have been, at each scrape)."""
        if not holding:
            self._outage_since = None
        elif self._outage_since is None:
            self._outage_since = time.monotonic()

    def _outage_s(self) -> float:
        since = self._outage_since
        return 0.0 if since is None else time.monotonic() - since

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
            self._timed_out.labels(*run_labels(target, kind, mode))
        self._queue_state.replace(snapshot)
