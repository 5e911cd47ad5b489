"""The worker's /metrics endpoint."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from dispatcher.metrics import WorkerMetrics, serve_metrics
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


def start_metrics(settings: Settings, port: int, executor: str) -> WorkerMetrics:
    """Serve the worker's metrics on ``port`` (0: any free port, logged)."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, executor=executor)
    bound = serve_metrics(registry, settings.metrics_host, port)
    log.info("worker metrics on http://%s:%d/metrics", settings.metrics_host, bound)
    return metrics
