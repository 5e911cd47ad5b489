"""Fixtures of the identity tests: the local identity provider and vaults, real Redis, a
private namespace per test, and a signed-in sign-in connection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.sign_in import import_refresh_token
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.crypto import SecretBox
from dispatcher.models import Connection
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.constants import CLIENT_ID, CLIENT_SECRET, SIGN_IN_USER, TENANT
from tests.support.identity import sign_in_connection


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
    client = aioredis.Redis.from_url(Settings().redis_url.get_secret_value())
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


@pytest.fixture
async def connection(broker: TokenBroker, idp: IdentityProvider) -> Connection:
    """A sign-in connection signed in with a fresh refresh token (counters reset after)."""
    conn = sign_in_connection()
    await import_refresh_token(
        broker, conn, idp.mint_refresh_token(TENANT, SIGN_IN_USER, CLIENT_ID)
    )
    idp.reset_counters()
    return conn
