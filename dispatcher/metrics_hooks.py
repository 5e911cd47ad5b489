"""What the data path reports to metrics, in its own words; a no-op when metrics are off."""

from __future__ import annotations

from dispatcher.models import Run, RunStatus


class MetricsHooks:
    """Receives the data path's observations. This base class records nothing."""

    def run_submitted(self, target: str, kind: str, mode: str) -> None:
        return None

    def run_rejected(self, target: str, kind: str, mode: str, code: str) -> None:
        return None

    def run_dispatched(self, target: str, kind: str, mode: str, now: float) -> None:
        return None

    def queue_wait(self, target: str, kind: str, mode: str, seconds: float) -> None:
        return None

    def run_completed(
        self, run: Run, status: RunStatus, code: str, duration_s: float | None
    ) -> None:
        return None

    def dead_letter(self, reason_class: str) -> None:
        return None

    def decision_latency(self, seconds: float) -> None:
        return None

    def events_published(self, count: int) -> None:
        return None
