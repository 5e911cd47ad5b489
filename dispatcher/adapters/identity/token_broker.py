"""Access tokens for sign-in connections, refreshed with msal, single-flight across replicas.

``access_token(connection, valid_for_s)`` reads top to bottom:

1. fast path, no lock: one Redis round trip (sealed cache + token state); a marked connection
   fails at once; a cached access token valid long enough is returned (no msal, no thread);
2. otherwise take the connection's asyncio lock (callers of this process wait for one refresh),
   re-read, then the connection's Redis lock (replicas wait for one refresh), re-read again:
   whoever held a lock before us has probably refreshed already;
3. still due: msal ``acquire_token_silent_with_error(force_refresh=True)`` in a bounded thread
   pool (msal is synchronous), store the rotated cache before releasing the lock, record the
   token state, or classify the failure (see :mod:`failures`) and mark the connection when the
   failure is permanent.

So N concurrent runs over any number of processes make one identity-provider request per expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import msal
from redis.asyncio import Redis

from dispatcher.adapters.identity.cache_view import usable_access_token
from dispatcher.adapters.identity.failures import (
    CLIENT_CONFIG,
    INTERACTION_REQUIRED,
    REAUTH_REQUIRED,
    TENANT_MISMATCH,
    UNAVAILABLE,
    RefreshFailure,
    classify_exception,
    classify_result,
)
from dispatcher.adapters.identity.msal_app import MsalAppFactory, select_account
from dispatcher.adapters.identity.token_store import TokenSnapshot, TokenStore, token_status
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import RunFailure
from dispatcher.models import Connection, ConnectionKind
from dispatcher.names import Names
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

LOCK_TTL_S = 30.0  # longer than a refresh can take (HTTP timeout 10 s, plus discovery)
LOCK_WAIT_S = 35.0


@dataclass(frozen=True)
class _Refreshed:
    """What a refresh in the thread pool produced (no exception crosses the thread)."""

    result: dict[str, Any] | None
    cache_json: str | None  # set when msal changed the cache
    failure: RefreshFailure | None
    finished_at: float


class TokenBroker:
    """Hands out access tokens for sign-in connections; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        names: Names,
        box: SecretBox,
        http_client: httpx.Client | None = None,
        *,
        max_threads: int = 8,
        on_refresh: Callable[[str, float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_refresh = on_refresh
        self.store = TokenStore(redis, names, box)
        self.apps = MsalAppFactory(settings, http_client)
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="msal")
        self._local_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def access_token(self, connection: Connection, valid_for_s: float) -> str:
        """An access token valid at least ``valid_for_s`` more (at least msal's 5 minutes when
        the identity provider issues shorter-lived tokens). Raises ``RunFailure`` or
        ``RetryableRunError`` (see :mod:`failures`); never puts a token in an error.
        """
        tenant_id = self._tenant(connection)
        snapshot = await self.store.load(connection)
        if token := self._usable(snapshot, tenant_id, valid_for_s):
            return token
        return await self._refresh(connection, tenant_id, valid_for_s)

    async def refresh_token_expiry(self, connection: Connection) -> float | None:
        """When the connection's refresh token expires, if the identity provider said so."""
        value = (await self.store.state(connection.connection_id)).get("refresh_token_expires_at")
        return float(value) if value else None

    async def status(self, connection: Connection) -> dict[str, Any]:
        """The connection's token state for operators (see :func:`token_status`); no token."""
        return token_status(connection, await self.store.load(connection))

    async def aclose(self) -> None:
        """Stop the thread pool and close the HTTP client this broker created."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self.apps.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` for shutdown hooks (does not wait for running refreshes)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.apps.close()

    # ---- the refresh ------------------------------------------------------------------------
    async def _refresh(self, connection: Connection, tenant_id: str, valid_for_s: float) -> str:
        connection_id = connection.connection_id
        async with self._local_lock(connection_id):
            snapshot = await self.store.load(connection)
            if cached := self._usable(snapshot, tenant_id, valid_for_s):
                return cached
            async with self.store.refresh_lock(connection_id, ttl_s=LOCK_TTL_S, wait_s=LOCK_WAIT_S):
                # Whoever held the lock before us has probably just refreshed: look again.
                snapshot = await self.store.load(connection)
                if cached := self._usable(snapshot, tenant_id, valid_for_s):
                    return cached
                return await self._refresh_locked(connection, tenant_id, valid_for_s, snapshot)

    async def _refresh_locked(
        self, connection: Connection, tenant_id: str, valid_for_s: float, snapshot: TokenSnapshot
    ) -> str:
        """Refresh with msal while holding both locks; store before the locks are released."""
        connection_id = connection.connection_id
        if snapshot.cache_json is None:
            raise _not_signed_in()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        refreshed = await loop.run_in_executor(
            self._executor, self._refresh_blocking, tenant_id, snapshot.cache_json
        )
        self._report(connection_id, refreshed.failure, time.monotonic() - started)
        if refreshed.cache_json is not None:
            await self.store.save_cache(connection, refreshed.cache_json)
        failure = refreshed.failure
        if failure is not None:
            if failure.marks_connection:
                await self.store.mark(connection_id, failure)
            elif failure.kind == UNAVAILABLE and (
                fallback := self._usable(snapshot, tenant_id, valid_for_s, aging_ok=True)
            ):
                return fallback  # only refresh_on had passed: the token in hand is still good
            raise failure.to_error()
        assert refreshed.result is not None
        await self.store.record_refresh(connection_id, _state_of(refreshed))
        token: str = refreshed.result["access_token"]
        return token

    def _refresh_blocking(self, tenant_id: str, cache_json: str) -> _Refreshed:
        """One forced silent refresh with msal (runs in the thread pool; never raises for an
        identity-provider failure, it returns it classified)."""
        cache = msal.SerializableTokenCache()
        cache.deserialize(cache_json)
        http = self.apps.http
        http.reset_status()
        try:
            app = self.apps.build(tenant_id, cache)
            accounts = app.get_accounts()
            account = select_account(accounts, tenant_id)
            if account is None:
                return _failed(_TENANT_MISMATCH if accounts else _NO_ACCOUNT)
            http.reset_status()  # from here, a missing status means msal made no request
            result = app.acquire_token_silent_with_error(
                self.apps.scopes, account, force_refresh=True
            )
        except Exception as exc:
            classified = classify_exception(exc, http.last_status())
            if classified is None:
                raise
            return _failed(classified)
        changed = cache.serialize() if cache.has_state_changed else None
        if result is None:
            return _failed(_NO_ACCOUNT)
        if "error" in result:
            return _failed(classify_result(result, http.last_status(), http.last_retry_after()))
        return _Refreshed(result, changed, None, time.time())

    # ---- helpers ----------------------------------------------------------------------------
    def _report(self, connection_id: str, failure: RefreshFailure | None, seconds: float) -> None:
        """Log the refresh (never a token) and hand its result to the metrics hook."""
        if failure is None:
            result = "success"
            log.info("refreshed the sign-in of connection %s in %.3f s", connection_id, seconds)
        else:
            result = _RESULTS.get(failure.kind, "permanent_failure")
            log.warning("refresh failed for connection %s: %s", connection_id, failure.describe())
        if self._on_refresh is not None:
            self._on_refresh(result, seconds)

    def _usable(
        self, snapshot: TokenSnapshot, tenant_id: str, valid_for_s: float, aging_ok: bool = False
    ) -> str | None:
        """A cached access token to return, None if a refresh is due; raises if marked."""
        marker = snapshot.marker
        if marker is not None:
            raise marker.to_error()
        token = usable_access_token(
            snapshot.cache_json,
            client_id=self._settings.client_id,
            tenant_id=tenant_id,
            scopes=self.apps.scopes,
            valid_for_s=valid_for_s,
            now=time.time(),
            aging_ok=aging_ok,
        )
        return None if token is None else token.secret

    def _local_lock(self, connection_id: str) -> asyncio.Lock:
        lock = self._local_locks.get(connection_id)
        if lock is None:
            lock = asyncio.Lock()
            self._local_locks[connection_id] = lock
        return lock

    @staticmethod
    def _tenant(connection: Connection) -> str:
        if connection.kind is not ConnectionKind.sign_in or not connection.tenant_id:
            raise RunFailure(
                ErrorCode.PasswordlessTokenExpiry, "not a sign-in connection: it has no tokens"
            )
        return connection.tenant_id


# Results as the token-refresh metric labels them.
_RESULTS = {
    UNAVAILABLE: "transient_failure",
    CLIENT_CONFIG: "misconfigured",
    REAUTH_REQUIRED: "permanent_failure",
    INTERACTION_REQUIRED: "permanent_failure",
    TENANT_MISMATCH: "permanent_failure",
}
_NO_ACCOUNT = RefreshFailure(REAUTH_REQUIRED, "no_refresh_token")
_TENANT_MISMATCH = RefreshFailure(TENANT_MISMATCH, "tenant_mismatch")


def _failed(failure: RefreshFailure) -> _Refreshed:
    return _Refreshed(None, None, failure, time.time())


def _not_signed_in() -> RunFailure:
    return RunFailure(
        ErrorCode.PasswordlessTokenExpiry,
        "the connection has not been signed in: run 'connections sign-in'",
    )


def _state_of(refreshed: _Refreshed) -> dict[str, str]:
    """Token-state fields from a successful refresh (expiries only, never a token)."""
    assert refreshed.result is not None
    now = refreshed.finished_at
    fields = {
        "last_refresh_at": f"{now:.3f}",
        "access_token_expires_at": f"{now + float(refreshed.result.get('expires_in', 0)):.3f}",
    }
    if "refresh_token_expires_in" in refreshed.result:
        expires = now + float(refreshed.result["refresh_token_expires_in"])
        fields["refresh_token_expires_at"] = f"{expires:.3f}"
    return fields
