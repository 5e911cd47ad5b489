"""Serving ``/metrics`` and listing what a registry exports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, start_http_server


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
