"""A connection's token cache belongs to the identity it was signed in for: re-applying the
connection with another account or owner leaves it unusable (the connection needs a
sign-in), never hands the previous user's tokens to the new one. The local identity provider
and the real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.adapters.identity.token_store import IDENTITY_FIELD, cache_context
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import RunFailure
from dispatcher.models import Connection
from dispatcher.names import Names

pytestmark = pytest.mark.integration

OTHER = "carol.other@contoso.com"


@pytest.mark.parametrize("change", ["account", "owner"])
async def test_re_applying_a_connection_with_another_identity_invalidates_its_tokens(
    broker: TokenBroker, connection: Connection, idp: IdentityProvider, change: str
) -> None:
    assert await broker.access_token(connection, 600)
    changed = connection.model_copy(update={change: OTHER})
    with pytest.raises(RunFailure) as failed:
        await broker.access_token(changed, 600)
    assert failed.value.code is ErrorCode.PasswordlessTokenExpiry
    assert idp.counters().get("token", 0) == 0  # no refresh with the old user's grant
    status = await broker.status(changed)
    assert status["needs_sign_in"] is True and status["signed_in"] is False
    # Applied back as it was, the sign-in is still good.
    assert await broker.access_token(connection, 600)


async def test_a_cache_sealed_before_the_binding_opens_only_for_its_account(
    broker: TokenBroker,
    connection: Connection,
    redis: aioredis.Redis,
    names: Names,
    box: SecretBox,
) -> None:
    snapshot = await broker.store.load(connection)
    assert snapshot.cache_json is not None
    # As an earlier version stored it: bound to the connection id only, no identity recorded.
    legacy = box.seal_text(snapshot.cache_json, cache_context(connection.connection_id))
    await redis.set(names.token_cache(connection.connection_id), legacy)
    await redis.hdel(names.token_state(connection.connection_id), IDENTITY_FIELD)
    assert (await broker.store.load(connection)).cache_json == snapshot.cache_json
    other = connection.model_copy(update={"account": OTHER})
    assert (await broker.store.load(other)).cache_json is None
