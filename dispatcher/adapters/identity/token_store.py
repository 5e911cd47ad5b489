"""Where a sign-in connection's tokens live in Redis, and how replicas take turns refreshing.

- ``names.token_cache(id)``: the connection's msal cache, sealed with :class:`SecretBox` and
  bound to the connection id and its identity (owner and account), and to its purpose, so that
  it cannot pass for a stored password; re-applying the connection with another account or
  owner makes the cache unusable (the connection must be signed in again);
- ``names.token_state(id)``: a hash with no token in it: expiries, last refresh, error marker;
- ``names.token_lock(id)``: the refresh lock, ``SET NX PX`` with an owner token, released by a
  compare-and-delete script so that a holder whose lock expired cannot free its successor's.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from dispatcher.adapters.identity.failures import RefreshFailure
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import IdentityProviderBusy, RunFailure, SealedDataError
from dispatcher.models import Connection
from dispatcher.names import Names

_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_ERROR_FIELDS = ("error", "error_kind", "error_codes", "error_at")


def identity_of(connection: Connection) -> str:
    """Who a connection's tokens belong to: its owner and account (case-folded). A changed
    tenant is refused on its own (TenantMismatchForConnectWithSignIn)."""
    return "|".join((value or "").casefold() for value in (connection.owner, connection.account))


IDENTITY_FIELD = "identity"


def identity_digest(identity: str) -> str:
    """What the token state records of the identity a sign-in was made for."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def cache_context(connection_id: str, identity: str | None = None) -> str:
    """The associated data a connection's token cache is sealed with (``identity`` None: the
    context of caches sealed before they were bound to the identity)."""
    if identity is None:
        return f"{connection_id}|msal-token-cache"
    return f"{connection_id}|{identity}|msal-token-cache"


def _mapping(fields: Mapping[str, str]) -> dict[Any, Any]:
    """``fields`` as redis-py's (invariant) hash mapping type."""
    return dict(fields)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class TokenSnapshot:
    """A connection's token cache (decrypted JSON) and token state, read together."""

    cache_json: str | None
    state: dict[str, str] = field(default_factory=dict)

    @property
    def marker(self) -> RefreshFailure | None:
        """The recorded permanent failure, if the connection must be signed in again."""
        return RefreshFailure.from_marker(self.state) if self.state.get("error") else None


@store_adapter
class TokenStore:
    """Reads and writes token caches and token state; works with bytes or str Redis clients."""

    def __init__(self, redis: Redis, names: Names, box: SecretBox) -> None:
        self._redis = redis
        self._names = names
        self._box = box

    async def load(self, connection: Connection) -> TokenSnapshot:
        """The cache and state in one round trip. A cache sealed for another identity of the
        connection (its account or owner changed since the sign-in) is no cache: the
        connection needs a sign-in."""
        connection_id = connection.connection_id
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._names.token_cache(connection_id))
            pipe.hgetall(self._names.token_state(connection_id))
            sealed, raw_state = await pipe.execute()
        state = {_text(k): _text(v) for k, v in (raw_state or {}).items()}
        if sealed is None:
            return TokenSnapshot(None, state)
        identity = identity_of(connection)
        signed_in_as = state.get(IDENTITY_FIELD)
        if signed_in_as is not None and signed_in_as != identity_digest(identity):
            return TokenSnapshot(None, state)  # signed in for another owner or account
        # A cache sealed before caches were bound to the identity: usable only for the account
        # that signed in.
        if (
            signed_in_as is None
            and (state.get("account") or "").casefold() != (connection.account or "").casefold()
        ):
            return TokenSnapshot(None, state)
        context = cache_context(connection_id, identity if signed_in_as else None)
        try:
            cache_json = self._box.open_text(_text(sealed), context)
        except SealedDataError:
            raise RunFailure(
                ErrorCode.PasswordlessTokenExpiry,
                "the stored token cache does not open with the configured secret keys: "
                "restore the key or sign the connection in again",
            ) from None
        return TokenSnapshot(cache_json, state)

    async def state(self, connection_id: str) -> dict[str, str]:
        """The token state alone (no decryption)."""
        raw = await self._redis.hgetall(self._names.token_state(connection_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def save_cache(self, connection: Connection, cache_json: str) -> None:
        """Store a changed cache (a rotated refresh token must never be lost)."""
        connection_id = connection.connection_id
        sealed = self._box.seal_text(
            cache_json, cache_context(connection_id, identity_of(connection))
        )
        key = self._names.token_state(connection_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._names.token_cache(connection_id), sealed)
            pipe.hsetnx(key, IDENTITY_FIELD, identity_digest(identity_of(connection)))
            await pipe.execute()

    async def record_refresh(self, connection_id: str, fields: Mapping[str, str]) -> None:
        """Note a successful refresh (expiries, time) and count it."""
        key = self._names.token_state(connection_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=_mapping(fields))
            pipe.hincrby(key, "refreshes", 1)
            await pipe.execute()

    async def mark(self, connection_id: str, failure: RefreshFailure) -> None:
        """Mark the connection broken: every replica then fails its runs without a request."""
        key = self._names.token_state(connection_id)
        await self._redis.hset(key, mapping=_mapping(failure.to_marker(time.time())))

    async def replace_sign_in(
        self, connection: Connection, cache_json: str, fields: Mapping[str, str]
    ) -> None:
        """Store a fresh sign-in: new cache, new state, error marker cleared, atomically."""
        connection_id = connection.connection_id
        sealed = self._box.seal_text(
            cache_json, cache_context(connection_id, identity_of(connection))
        )
        state_key = self._names.token_state(connection_id)
        bound = {**fields, IDENTITY_FIELD: identity_digest(identity_of(connection))}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._names.token_cache(connection_id), sealed)
            pipe.delete(state_key)
            pipe.hset(state_key, mapping=_mapping(bound))
            await pipe.execute()

    async def forget(self, connection_id: str) -> None:
        """Delete every identity key of the connection (connection removed)."""
        await self._redis.delete(
            self._names.token_cache(connection_id),
            self._names.token_state(connection_id),
            self._names.token_lock(connection_id),
        )

    @asynccontextmanager
    async def refresh_lock(
        self, connection_id: str, *, ttl_s: float, wait_s: float, poll_s: float = 0.01
    ) -> AsyncIterator[None]:
        """Hold the connection's refresh lock, shared by every process.

        ``ttl_s`` must exceed the longest refresh (HTTP timeout), so that a crashed holder
        frees the lock on its own; waiting longer than ``wait_s`` is a retryable failure.
        """
        key = self._names.token_lock(connection_id)
        owner = secrets.token_hex(16)
        give_up_at = time.monotonic() + wait_s
        while not await self._redis.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            if time.monotonic() >= give_up_at:
                raise IdentityProviderBusy("another replica is still refreshing this connection")
            await asyncio.sleep(poll_s)
        try:
            yield
        finally:
            await self._redis.eval(_RELEASE_LOCK, 1, key, owner)


def token_status(connection: Connection, snapshot: TokenSnapshot) -> dict[str, Any]:
    """A sign-in connection's token state for operators: expiries, last refresh, error marker.

    Holds no token. ``needs_sign_in`` says whether runs of the connection cannot succeed.
    """
    state, marker = snapshot.state, snapshot.marker

    def number(name: str) -> float | None:
        return float(state[name]) if state.get(name) else None

    return {
        "connection_id": connection.connection_id,
        "account": state.get("account") or connection.account,
        "tenant_id": connection.tenant_id,
        "signed_in": snapshot.cache_json is not None,
        "signed_in_at": number("signed_in_at"),
        "access_token_expires_at": number("access_token_expires_at"),
        "refresh_token_expires_at": number("refresh_token_expires_at"),
        "last_refresh_at": number("last_refresh_at"),
        "refreshes": int(state.get("refreshes", 0)),
        "error": None if marker is None else marker.describe(),
        "error_at": number("error_at"),
        "needs_sign_in": snapshot.cache_json is None or marker is not None,
    }
