"""Optional parts of a replica, built from the settings: identity sources and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from dispatcher.metrics import DispatcherMetrics, serve_metrics
from dispatcher.metrics_hooks import MetricsHooks, NullMetrics
from dispatcher.ports import PasswordSource, TokenSource
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from dispatcher.adapters.runtime import Runtime

log = logging.getLogger(__name__)

QUEUE_STATE_INTERVAL_S = 2.0


def identity_sources(
    settings: Settings, rt: Runtime, metrics: MetricsHooks | None = None
) -> tuple[TokenSource | None, PasswordSource | None, list[Callable[[], None]]]:
    """The token broker and credential resolver, when secret keys are configured."""
    if not settings.secret_keys.get_secret_value():
        log.warning("RUNDISPATCH_SECRET_KEYS is not set: runs cannot receive secrets")
        return None, None, []
    from dispatcher.crypto import SecretBox

    box = SecretBox.from_settings(settings)
    try:
        from dispatcher.adapters.identity.credentials import CredentialResolver
        from dispatcher.adapters.identity.token_broker import TokenBroker
    except ImportError:

        class _Stored:
            async def password(self, connection):  # type: ignore[no-untyped-def]
                return box.open(connection.password_sealed or "", connection.connection_id).decode()

        return None, _Stored(), []
    tokens = TokenBroker(settings, rt.redis, rt.names, box) if settings.client_id else None
    passwords = CredentialResolver(settings, box)
    closers: list[Callable[[], None]] = []
    for source in (tokens, passwords):
        close = getattr(source, "close", None)
        if callable(close):
            closers.append(close)
    return tokens, passwords, closers


def metrics_for(
    settings: Settings, rt: Runtime, port: int | None
) -> tuple[MetricsHooks, DispatcherMetrics | None, Callable[[], Coroutine[Any, Any, None]] | None]:
    """Metrics and the periodic queue-state reporter; off when the port is negative."""
    port = settings.metrics_port if port is None else port
    if port < 0:
        return NullMetrics(), None, None
    from dispatcher.adapters.queue_state import queue_state

    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    bound = serve_metrics(registry, settings.metrics_host, port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, bound)

    async def report() -> None:
        while True:
            try:
                snapshot = await queue_state(
                    rt.runs, rt.fleet, rt.machines, settings.offline_after_s
                )
                metrics.set_queue_state(snapshot)
                metrics.set_outbox_backlog(await rt.runs.outbox_length())
            except Exception as exc:
                log.warning("queue state not refreshed: %s", exc)
            await asyncio.sleep(QUEUE_STATE_INTERVAL_S)

    return metrics, metrics, report
