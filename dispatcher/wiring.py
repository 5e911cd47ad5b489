"""Optional parts of a replica, built from the settings: identity sources and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry

from dispatcher.metrics import DispatcherMetrics, serve_metrics
from dispatcher.metrics_hooks import MetricsHooks, NullMetrics
from dispatcher.ports import PasswordSource, TokenSource
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from dispatcher.adapters.runtime import Runtime

log = logging.getLogger(__name__)

B = TypeVar("B")

QUEUE_STATE_INTERVAL_S = 2.0


def identity_sources(
    settings: Settings, rt: Runtime, metrics: MetricsHooks
) -> tuple[TokenSource | None, PasswordSource | None, list[Callable[[], Awaitable[None]]]]:
    """The token broker (when a client is configured) and the credential resolver."""
    if not settings.secret_keys.get_secret_value():
        log.warning("RUNDISPATCH_SECRET_KEYS is not set: runs cannot receive secrets")
        return None, None, []
    from dispatcher.adapters.identity.credentials import CredentialResolver
    from dispatcher.adapters.identity.token_broker import TokenBroker
    from dispatcher.crypto import SecretBox

    box = SecretBox.from_settings(settings)
    passwords = CredentialResolver(settings, box)
    closers: list[Callable[[], Awaitable[None]]] = [passwords.aclose]
    tokens = None
    if settings.client_id:
        tokens = TokenBroker(settings, rt.redis, rt.names, box, on_refresh=metrics.token_refresh)
        closers.append(tokens.aclose)
    else:
        log.info("RUNDISPATCH_CLIENT_ID is not set: sign-in connections cannot get tokens")
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
