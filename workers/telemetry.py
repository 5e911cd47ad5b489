"""The worker's ``/metrics``, ``/healthz`` and ``/readyz`` endpoint."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from dispatcher.metrics import WorkerMetrics
from dispatcher.metrics.health import HealthServer, serve_health
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


def start_metrics(
    settings: Settings, port: int, executor: str
) -> tuple[WorkerMetrics, HealthServer]:
    """Serve the worker's metrics and probes on ``port`` (0: any free port, logged)."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, executor=executor)
    server = serve_health(registry, settings.metrics_host, port)
    log.info("worker metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    return metrics, server
