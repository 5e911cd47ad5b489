"""Fixtures of the identity tests: the local identity provider and vaults, real Redis, a
private namespace per test, and a signed-in sign-in connection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dispatcher.adapters.identity.cache_view import expire_access_tokens
from dispatcher.adapters.identity.sign_in import import_refresh_token
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.crypto import SecretBox
from dispatcher.devtools.idp import IdentityProvider
from dispatcher.models import Connection, ConnectionKind, Target
from dispatcher.names import Names
from dispatcher.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
TENANT = "11111111-2222-3333-4444-555555555555"
ACCOUNT = "bob@contoso.com"
CLIENT_ID = "rundispatch-tests"
CLIENT_SECRET = "tests-client-secret-value"


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def idp(cert_dir: Path) -> Iterator[IdentityProvider]:
    with IdentityProvider(
        cert_dir=cert_dir, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    ) as provider:
        yield provider


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def identity_settings(idp: IdentityProvider, namespace: str) -> Settings:
    return Settings(
        redis_url=REDIS_URL,
        namespace=namespace,
        secret_keys=f"k1:{SecretBox.generate_key()}",
        authority_host=idp.url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        idp_ca_file=idp.ca_file,
    )


@pytest.fixture
def names(namespace: str) -> Names:
    return Names(namespace)


@pytest.fixture
async def redis(names: Names) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    keys = [key async for key in client.scan_iter(match=names.pattern(), count=500)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def box(identity_settings: Settings) -> SecretBox:
    return SecretBox.from_settings(identity_settings)


@pytest.fixture
async def broker(
    identity_settings: Settings, redis: aioredis.Redis, names: Names, box: SecretBox
) -> AsyncIterator[TokenBroker]:
    token_broker = TokenBroker(identity_settings, redis, names, box)
    yield token_broker
    await token_broker.aclose()


def sign_in_connection(connection_id: str = "s1", tenant_id: str = TENANT) -> Connection:
    return Connection(
        connection_id=connection_id,
        owner=ACCOUNT,
        kind=ConnectionKind.sign_in,
        target=Target(machine_id="m1"),
        account=ACCOUNT,
        tenant_id=tenant_id,
    )


@pytest.fixture
async def connection(broker: TokenBroker, idp: IdentityProvider) -> Connection:
    """A sign-in connection signed in with a fresh refresh token (counters reset after)."""
    conn = sign_in_connection()
    await import_refresh_token(broker, conn, idp.mint_refresh_token(TENANT, ACCOUNT, CLIENT_ID))
    idp.reset_counters()
    return conn


async def expire_access_token(broker: TokenBroker, connection_id: str) -> None:
    """Expire the cached access token, as time would."""
    snapshot = await broker.store.load(connection_id)
    assert snapshot.cache_json is not None
    await broker.store.save_cache(connection_id, expire_access_tokens(snapshot.cache_json, 0))
