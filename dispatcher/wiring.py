"""Optional parts of a replica, built from the settings: identity sources and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from dispatcher.metrics_hooks import MetricsHooks
from dispatcher.ports import PasswordSource, TokenSource
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from dispatcher.adapters.runtime import Runtime

log = logging.getLogger(__name__)


def identity_sources(
    settings: Settings, rt: Runtime
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
) -> tuple[MetricsHooks, Callable[[], Coroutine[Any, Any, None]] | None]:
    """Metrics hooks and the periodic queue-state reporter (None when metrics are off)."""
    return MetricsHooks(), None
