"""A machine worker's metrics (see :mod:`~dispatcher.metrics.specs` for names and labels)."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry

from dispatcher import __version__
from dispatcher.metrics.specs import (
    CODES,
    EXECUTOR_ERRORS,
    OTHER,
    W_BUILD,
    W_DURATION,
    W_EXECUTOR_ERRORS,
    W_HEARTBEAT_FAILURES,
    W_HEARTBEATS,
    W_RUNNING,
    W_RUNS,
    WORKER_OUTCOMES,
    closed_value,
    counter,
    gauge,
    histogram,
)


class WorkerMetrics:
    """A machine worker's metrics (the machine is the scrape target, not a label)."""

    def __init__(
        self, registry: CollectorRegistry, executor: str = "unknown", version: str = __version__
    ) -> None:
        self._runs = counter(W_RUNS, registry)
        self._duration = histogram(W_DURATION, registry)
        self._heartbeats = counter(W_HEARTBEATS, registry)
        self._heartbeat_failures = counter(W_HEARTBEAT_FAILURES, registry)
        self._running = gauge(W_RUNNING, registry)
        self._executor_errors = counter(W_EXECUTOR_ERRORS, registry)
        build = gauge(W_BUILD, registry)
        build.labels(version, platform.python_version(), executor).set(1)
        for reason in EXECUTOR_ERRORS - {OTHER}:
            self._executor_errors.labels(reason)

    def run_executed(self, outcome: str, duration_s: float, code: str | None = None) -> None:
        """Count a finished run by outcome and code and observe its duration."""
        value = closed_value(outcome, WORKER_OUTCOMES)
        self._runs.labels(value, closed_value(code, CODES)).inc()
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
        self._executor_errors.labels(closed_value(reason, EXECUTOR_ERRORS)).inc()
