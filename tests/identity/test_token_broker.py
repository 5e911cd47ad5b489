"""The token broker against the local identity provider and the real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

import pytest
import redis.asyncio as aioredis

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.retry import retry_transient
from dispatcher.adapters.identity.sign_in import import_refresh_token
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import IdentityProviderBusy, RetryableRunError, RunFailure
from dispatcher.models import Connection
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.constants import CLIENT_ID, SIGN_IN_USER, TENANT
from tests.support.identity import expire_access_token, sign_in_connection
from tests.support.slack import bound

pytestmark = pytest.mark.integration


async def all_values(redis: aioredis.Redis, names: Names) -> str:
    """Every Redis value of the namespace, as one string (to look for leaked secrets)."""
    chunks: list[str] = []
    async for key in redis.scan_iter(match=names.pattern()):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            chunks.append(repr(await redis.get(key)))
        elif kind == "hash":
            chunks.append(repr(await redis.hgetall(key)))
    return "\n".join(chunks)


async def test_cached_token_then_expired_token_is_refreshed(
    identity_settings: Settings,
    broker: TokenBroker,
    connection: Connection,
    idp: IdentityProvider,
    redis: aioredis.Redis,
    names: Names,
    box: SecretBox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    refreshes: list[str] = []
    broker = TokenBroker(
        identity_settings, redis, names, box, on_refresh=lambda result, _: refreshes.append(result)
    )
    first = await broker.access_token(connection, 600)
    assert await broker.access_token(connection, 600) == first
    assert idp.counters().get("token", 0) == 0  # served from the cache

    await expire_access_token(broker, connection)
    refreshed = await broker.access_token(connection, 600)
    assert refreshed != first
    assert idp.counters()["token"] == 1
    assert await broker.access_token(connection, 600) == refreshed

    status = await broker.status(connection)
    assert status["refreshes"] == 1 and not status["needs_sign_in"]
    assert status["access_token_expires_at"] > time.time() + 3000
    assert status["refresh_token_expires_at"] > time.time() + 80 * 86400
    assert refreshed not in json.dumps(status)
    stored = await all_values(redis, names)
    assert refreshed not in stored and first not in stored and "rt." not in stored
    assert refreshes == ["success"]
    assert "refreshed the sign-in of connection s1" in caplog.text
    assert refreshed not in caplog.text and first not in caplog.text and "rt." not in caplog.text
    await broker.aclose()


async def test_revoked_grant_fails_first_run_and_later_ones_fast(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.revoke_user(SIGN_IN_USER)
    with pytest.raises(RunFailure) as first:
        await broker.access_token(connection, 600)
    assert first.value.code is ErrorCode.PasswordlessTokenExpiry
    assert "AADSTS50173" in first.value.message
    assert idp.counters()["token"] == 1

    for _ in range(10):
        with pytest.raises(RunFailure) as later:
            await broker.access_token(connection, 600)
        assert later.value.code is ErrorCode.PasswordlessTokenExpiry
    assert idp.counters()["token"] == 1  # no further identity-provider request
    status = await broker.status(connection)
    assert status["needs_sign_in"] and "sign in again" in status["error"]

    # Signing in again clears the marker.
    await import_refresh_token(broker, connection, idp.mint_refresh_token(TENANT, SIGN_IN_USER))
    assert await broker.access_token(connection, 600)
    assert not (await broker.status(connection))["needs_sign_in"]


async def test_marker_is_shared_by_replicas(
    broker: TokenBroker,
    connection: Connection,
    idp: IdentityProvider,
    identity_settings,  # type: ignore[no-untyped-def]
    redis: aioredis.Redis,
    names: Names,
    box,  # type: ignore[no-untyped-def]
) -> None:
    await expire_access_token(broker, connection)
    idp.expire_refresh_tokens(SIGN_IN_USER)
    with pytest.raises(RunFailure, match="AADSTS700082"):
        await broker.access_token(connection, 600)
    other_replica = TokenBroker(identity_settings, redis, names, box)
    try:
        with pytest.raises(RunFailure) as caught:
            await other_replica.access_token(connection, 600)
        assert caught.value.code is ErrorCode.PasswordlessTokenExpiry
    finally:
        await other_replica.aclose()
    assert idp.counters()["token"] == 1


async def test_503_is_retried_within_the_deadline(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.fail_next(1, 503, endpoint="token", retry_after=1)
    idp.fail_next(1, 429, endpoint="token", retry_after=1)
    attempts = 0

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        return await broker.access_token(connection, 600)

    token = await retry_transient(attempt, deadline=time.time() + 20, first_delay_s=0.05)
    assert token and attempts >= 3
    assert idp.counters()["token"] == 3  # 503, 429, success; msal's replays are not requests
    assert not (await broker.status(connection))["needs_sign_in"]


async def test_retry_gives_up_at_the_deadline(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.fail_next(50, 503, endpoint="token", retry_after=1)
    started = time.monotonic()
    with pytest.raises(IdentityProviderBusy) as caught:
        await retry_transient(
            lambda: broker.access_token(connection, 600),
            deadline=time.time() + 1.5,
            first_delay_s=0.05,
        )
    assert caught.value.code is ErrorCode.IdentityProviderUnavailable
    # It gives up at its deadline (1.5 s), not after the 50 failures it was offered.
    assert time.monotonic() - started < bound(1.5)


async def test_transient_failures_are_retryable_and_do_not_mark(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.fail_next(1, 400, endpoint="token", html=True)  # a proxy's page, not JSON
    with pytest.raises(RetryableRunError, match="non-JSON"):
        await broker.access_token(connection, 600)
    assert not (await broker.status(connection))["needs_sign_in"]


async def test_network_failure_is_retryable(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.stop()
    with pytest.raises(RetryableRunError, match="network"):
        await broker.access_token(connection, 600)
    assert not (await broker.status(connection))["needs_sign_in"]


async def test_wrong_client_secret_is_a_misconfiguration(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    await expire_access_token(broker, connection)
    idp.set_client(CLIENT_ID, "rotated-secret")
    with pytest.raises(RunFailure) as caught:
        await broker.access_token(connection, 600)
    assert caught.value.code is ErrorCode.IdentityProviderMisconfigured
    assert "tests-client-secret" not in str(caught.value)
    assert not (await broker.status(connection))["needs_sign_in"]  # the user is not at fault


async def test_not_signed_in_and_tenant_mismatch_make_no_token_request(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    with pytest.raises(RunFailure, match="not been signed in"):
        await broker.access_token(sign_in_connection("never-signed-in"), 600)
    other_tenant = sign_in_connection("s1", "99999999-2222-3333-4444-555555555555")
    with pytest.raises(RunFailure) as caught:
        await broker.access_token(other_tenant, 600)
    assert caught.value.code is ErrorCode.TenantMismatchForConnectWithSignIn
    assert idp.counters().get("token", 0) == 0


async def test_validity_longer_than_the_token_lifetime_does_not_refresh_every_call(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider
) -> None:
    # The identity provider issues 1 h tokens; asking for 2 h returns the fresh one.
    await broker.access_token(connection, 7200)
    await broker.access_token(connection, 7200)
    assert idp.counters().get("token", 0) == 0
    # Asking for 3590 s on a 3600 s token that has aged forces one refresh.
    snapshot = await broker.store.load(connection)
    cache = json.loads(snapshot.cache_json or "")
    for entry in cache["AccessToken"].values():
        entry["expires_on"] = str(int(time.time()) + 1000)
        entry["cached_at"] = str(int(time.time()) - 2600)
    await broker.store.save_cache(connection, json.dumps(cache))
    await broker.access_token(connection, 600)
    assert idp.counters().get("token", 0) == 0
    await broker.access_token(connection, 3000)
    assert idp.counters()["token"] == 1


async def test_concurrent_callers_in_two_replicas_make_one_request(
    broker: TokenBroker,
    connection: Connection,
    idp: IdentityProvider,
    identity_settings,  # type: ignore[no-untyped-def]
    redis: aioredis.Redis,
    names: Names,
    box,  # type: ignore[no-untyped-def]
) -> None:
    idp.set_latency(0.05, endpoint="token")
    other = TokenBroker(identity_settings, redis, names, box)
    try:
        for round_number in (1, 2):
            await expire_access_token(broker, connection)
            idp.reset_counters()
            calls = [b.access_token(connection, 600) for b in (broker, other) for _ in range(50)]
            digests = {hashlib.sha256(t.encode()).digest() for t in await asyncio.gather(*calls)}
            assert len(digests) == 1, round_number
            assert idp.counters()["token"] == 1, round_number
    finally:
        await other.aclose()


async def test_refresh_token_expiry_is_known(broker: TokenBroker, connection: Connection) -> None:
    expiry = await broker.refresh_token_expiry(connection)
    assert expiry is not None and expiry > time.time() + 80 * 86400
    assert await broker.refresh_token_expiry(sign_in_connection("unknown")) is None
