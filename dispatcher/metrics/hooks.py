"""What the data path reports to metrics: the Protocols ``DispatcherMetrics`` and
``WorkerMetrics`` satisfy, and no-op implementations for tools and tests that run without
metrics (so that no caller asks ``if metrics is None``)."""

from __future__ import annotations

from typing import Protocol


class MetricsHooks(Protocol):
    """What the dispatcher's use cases report."""

    def run_submitted(self, target: str, kind: str, mode: str) -> None: ...

    def run_rejected(
        self, target: str | None, kind: str | None, mode: str | None, code: str
    ) -> None: ...

    def run_dispatched(self, target: str, kind: str, mode: str) -> None: ...

    def queue_wait(self, seconds: float, target: str, kind: str) -> None: ...

    def run_completed(
        self,
        target: str,
        kind: str,
        mode: str,
        *,
        status: str,
        code: str | None,
        duration_s: float | None = None,
    ) -> None: ...

    def decision_latency(self, seconds: float) -> None: ...

    def token_refresh(self, result: str, seconds: float) -> None: ...

    def dead_letter(self, reason_class: str) -> None: ...

    def message_refused(self, reason: str) -> None: ...

    def event_published(self, event: str, count: int = 1) -> None: ...


class NullMetrics:
    """Records nothing."""

    def run_submitted(self, target: str, kind: str, mode: str) -> None:
        return None

    def run_rejected(
        self, target: str | None, kind: str | None, mode: str | None, code: str
    ) -> None:
        return None

    def run_dispatched(self, target: str, kind: str, mode: str) -> None:
        return None

    def queue_wait(self, seconds: float, target: str, kind: str) -> None:
        return None

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
        return None

    def decision_latency(self, seconds: float) -> None:
        return None

    def token_refresh(self, result: str, seconds: float) -> None:
        return None

    def dead_letter(self, reason_class: str) -> None:
        return None

    def message_refused(self, reason: str) -> None:
        return None

    def event_published(self, event: str, count: int = 1) -> None:
        return None


class WorkerHooks(Protocol):
    """What a machine worker reports."""

    def run_executed(self, outcome: str, duration_s: float, code: str | None = None) -> None: ...

    def heartbeat_sent(self) -> None: ...

    def heartbeat_failed(self) -> None: ...

    def set_running_runs(self, count: int) -> None: ...

    def executor_error(self, reason: str) -> None: ...


class NullWorkerMetrics:
    """Records nothing (a worker started without ``--metrics-port``)."""

    def run_executed(self, outcome: str, duration_s: float, code: str | None = None) -> None:
        return None

    def heartbeat_sent(self) -> None:
        return None

    def heartbeat_failed(self) -> None:
        return None

    def set_running_runs(self, count: int) -> None:
        return None

    def executor_error(self, reason: str) -> None:
        return None
