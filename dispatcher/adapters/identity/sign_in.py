"""Signing a sign-in connection in: msal's device code flow, from a terminal.

The terminal shows a URL and a code; the connection's user opens the URL anywhere, enters the
code and signs in; msal then redeems the device code (as the same confidential client that will
later refresh the tokens). The new cache replaces the connection's old one and clears its error
marker, in one Redis transaction. :func:`import_refresh_token` does the same from a refresh
token obtained elsewhere (migrations, tests, demos).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msal

from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.errors import SignInFailed
from dispatcher.models import Connection, ConnectionKind

DEFAULT_SIGN_IN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class DeviceCodePrompt:
    """What the user must be told: where to go and which code to enter."""

    verification_uri: str
    user_code: str
    message: str
    expires_at: float


async def sign_in_with_device_code(
    broker: TokenBroker,
    connection: Connection,
    show: Callable[[DeviceCodePrompt], None],
    *,
    timeout_s: float = DEFAULT_SIGN_IN_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the device code flow for ``connection``, store its tokens, return its token status.

    ``show`` is called once with the URL and code for the user. Raises :class:`SignInFailed`
    when the user does not sign in in time, declines, or signs in with another account.
    """
    tenant_id = _tenant(connection)
    cache = msal.SerializableTokenCache()
    app = await asyncio.to_thread(broker.apps.build, tenant_id, cache, device_flow=True)
    flow: dict[str, Any] = await asyncio.to_thread(app.initiate_device_flow, broker.apps.scopes)
    if "user_code" not in flow:
        raise SignInFailed(f"the identity provider refused the device code flow: {_cause(flow)}")
    flow["expires_at"] = min(float(flow["expires_at"]), time.time() + timeout_s)
    show(
        DeviceCodePrompt(
            verification_uri=str(flow.get("verification_uri", "")),
            user_code=str(flow["user_code"]),
            message=str(flow.get("message", "")),
            expires_at=float(flow["expires_at"]),
        )
    )
    try:
        result = await asyncio.to_thread(app.acquire_token_by_device_flow, flow)
    except asyncio.CancelledError:
        flow["expires_at"] = 0  # msal's documented way to stop its polling loop
        raise
    return await _store(broker, connection, cache, result)


async def import_refresh_token(
    broker: TokenBroker, connection: Connection, refresh_token: str
) -> dict[str, Any]:
    """Sign ``connection`` in with an existing refresh token; return its token status."""
    tenant_id = _tenant(connection)
    cache = msal.SerializableTokenCache()

    def redeem() -> dict[str, Any]:
        app = broker.apps.build(tenant_id, cache)
        result: dict[str, Any] = app.acquire_token_by_refresh_token(
            refresh_token, broker.apps.scopes
        )
        return result

    return await _store(broker, connection, cache, await asyncio.to_thread(redeem))


async def _store(
    broker: TokenBroker,
    connection: Connection,
    cache: msal.SerializableTokenCache,
    result: Mapping[str, Any],
) -> dict[str, Any]:
    if "access_token" not in result:
        raise SignInFailed(f"the sign-in did not complete: {_cause(result)}")
    claims: Mapping[str, Any] = result.get("id_token_claims") or {}
    username = str(claims.get("preferred_username") or claims.get("upn") or "")
    if connection.account and username.lower() != connection.account.lower():
        raise SignInFailed(
            f"signed in as {username or 'an unknown account'}, "
            f"but the connection's account is {connection.account}"
        )
    if str(claims.get("tid", connection.tenant_id)).lower() != str(connection.tenant_id).lower():
        raise SignInFailed("signed in to another tenant than the connection's")
    now = time.time()
    fields = {
        "account": username,
        "signed_in_at": f"{now:.3f}",
        "last_refresh_at": f"{now:.3f}",
        "access_token_expires_at": f"{now + float(result.get('expires_in', 0)):.3f}",
    }
    if "refresh_token_expires_in" in result:
        fields["refresh_token_expires_at"] = (
            f"{now + float(result['refresh_token_expires_in']):.3f}"
        )
    await broker.store.replace_sign_in(connection, cache.serialize(), fields)
    return await broker.status(connection)


def _cause(result: Mapping[str, Any]) -> str:
    """The error of an msal result, without anything else it may carry."""
    codes = ", ".join(f"AADSTS{code}" for code in result.get("error_codes", ()))
    error = str(result.get("error", "no tokens in the answer"))
    return f"{error} ({codes})" if codes else error


def _tenant(connection: Connection) -> str:
    if connection.kind is not ConnectionKind.sign_in or not connection.tenant_id:
        raise SignInFailed(f"connection {connection.connection_id} is not a sign-in connection")
    return connection.tenant_id
