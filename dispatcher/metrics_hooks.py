"""What the data path reports to metrics: the Protocol ``DispatcherMetrics`` satisfies, and a
no-op implementation for tools and tests that run without metrics."""

from __future__ import annotations

from typing import Protocol


class MetricsHooks(Protocol):
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

    def event_published(self, event: str, count: int = 1) -> None:
        return None
