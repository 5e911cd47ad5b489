"""Passwords resolved at call time: stored, Azure Key Vault and CyberArk CCP (local servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.idp import IdentityProvider
from devtools.vaults import CyberArkServer, KeyVaultServer
from dispatcher.adapters.identity.credentials import CredentialResolver
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.models import Connection, ConnectionKind, SecretRef, Target
from dispatcher.settings import Settings
from tests.support.constants import CLIENT_ID, TENANT

pytestmark = pytest.mark.integration


@pytest.fixture
def key_vault(cert_dir: Path, idp: IdentityProvider) -> Iterator[KeyVaultServer]:
    with KeyVaultServer(cert_dir=cert_dir, authority=f"{idp.url}/{TENANT}") as vault:
        yield vault


@pytest.fixture
def cyberark(cert_dir: Path) -> Iterator[CyberArkServer]:
    with CyberArkServer(cert_dir=cert_dir) as vault:
        yield vault


@pytest.fixture
async def resolver(
    identity_settings: Settings, box: SecretBox
) -> AsyncIterator[CredentialResolver]:
    credential_resolver = CredentialResolver(identity_settings, box)
    yield credential_resolver
    await credential_resolver.aclose()


def credentials(
    connection_id: str = "c1", *, sealed: str | None = None, ref: SecretRef | None = None
) -> Connection:
    return Connection(
        connection_id=connection_id,
        owner="alice@contoso.com",
        kind=ConnectionKind.credentials,
        target=Target(group_id="finance"),
        username="CONTOSO\\svc-fin",
        password_sealed=sealed,
        secret_ref=ref,
    )


def kv_ref(vault: KeyVaultServer, name: str = "fin") -> SecretRef:
    return SecretRef(provider="azure_key_vault", vault_url=vault.url, secret_name=name)


def ccp_ref(vault: CyberArkServer, app_id: str = "RunDispatch") -> SecretRef:
    return SecretRef(
        provider="cyberark", vault_url=vault.url, app_id=app_id, safe="Finance", object="svc-fin"
    )


async def test_stored_password_opens_only_for_its_connection(
    resolver: CredentialResolver, box: SecretBox
) -> None:
    sealed = box.seal(b"stored-pw", "c1")
    assert await resolver.password(credentials("c1", sealed=sealed)) == "stored-pw"
    with pytest.raises(RunFailure) as caught:
        await resolver.password(credentials("c2", sealed=sealed))
    assert caught.value.code is ErrorCode.SecretAccessDenied


async def test_key_vault_secret_is_fetched_at_call_time(
    resolver: CredentialResolver, key_vault: KeyVaultServer, idp: IdentityProvider
) -> None:
    connection = credentials(ref=kv_ref(key_vault))
    key_vault.set_secret("fin", "kv-value-1")
    assert await resolver.password(connection) == "kv-value-1"
    key_vault.set_secret("fin", "kv-value-2")
    assert await resolver.password(connection) == "kv-value-2"
    # One challenge, then two authenticated reads; one client-credentials token, reused.
    assert key_vault.counters()["secrets"] == 3
    assert idp.counters()["token"] == 1


async def test_key_vault_failures_map_to_run_errors(
    resolver: CredentialResolver, key_vault: KeyVaultServer
) -> None:
    key_vault.set_secret("fin", "kv-value")
    with pytest.raises(RunFailure) as missing:
        await resolver.password(credentials(ref=kv_ref(key_vault, "other")))
    assert missing.value.code is ErrorCode.SecretNotFound
    assert "SecretNotFound" in missing.value.message

    key_vault.forbid_app(CLIENT_ID)
    with pytest.raises(RunFailure) as denied:
        await resolver.password(credentials(ref=kv_ref(key_vault)))
    assert denied.value.code is ErrorCode.SecretAccessDenied
    key_vault.allow_app(CLIENT_ID)

    key_vault.fail_next(1, 503, endpoint="secrets")
    with pytest.raises(RetryableRunError) as busy:
        await resolver.password(credentials(ref=kv_ref(key_vault)))
    assert busy.value.code is ErrorCode.VaultUnavailable
    assert await resolver.password(credentials(ref=kv_ref(key_vault))) == "kv-value"


async def test_key_vault_token_refused_is_access_denied(
    resolver: CredentialResolver, key_vault: KeyVaultServer, idp: IdentityProvider
) -> None:
    key_vault.set_secret("fin", "kv-value")
    idp.set_client(CLIENT_ID, "another-secret")
    with pytest.raises(RunFailure) as caught:
        await resolver.password(credentials(ref=kv_ref(key_vault)))
    assert caught.value.code is ErrorCode.SecretAccessDenied
    assert "invalid_client" in caught.value.message


async def test_key_vault_challenge_for_a_foreign_audience_is_refused(
    resolver: CredentialResolver, cert_dir: Path, idp: IdentityProvider
) -> None:
    with KeyVaultServer(
        cert_dir=cert_dir, authority=f"{idp.url}/{TENANT}", resource="https://vault.azure.net"
    ) as vault:
        vault.set_secret("fin", "kv-value")
        with pytest.raises(RunFailure, match="challenge"):
            await resolver.password(credentials(ref=kv_ref(vault)))
    assert idp.counters().get("token", 0) == 0  # the client secret was not sent


async def test_cyberark_secret_is_fetched_at_call_time(
    resolver: CredentialResolver, cyberark: CyberArkServer
) -> None:
    connection = credentials(ref=ccp_ref(cyberark))
    cyberark.set_account("Finance", "svc-fin", "ccp-value-1")
    assert await resolver.password(connection) == "ccp-value-1"
    cyberark.set_account("Finance", "svc-fin", "ccp-value-2")
    assert await resolver.password(connection) == "ccp-value-2"
    assert cyberark.counters()["accounts"] == 2


async def test_cyberark_failures_map_to_run_errors(
    resolver: CredentialResolver, cyberark: CyberArkServer
) -> None:
    with pytest.raises(RunFailure) as missing:
        await resolver.password(credentials(ref=ccp_ref(cyberark)))
    assert missing.value.code is ErrorCode.SecretNotFound
    assert "APPAP004E" in missing.value.message

    cyberark.set_account("Finance", "svc-fin", "ccp-value")
    cyberark.deny_app("Intruder")
    with pytest.raises(RunFailure) as denied:
        await resolver.password(credentials(ref=ccp_ref(cyberark, "Intruder")))
    assert denied.value.code is ErrorCode.SecretAccessDenied

    cyberark.fail_next(1, 500)
    with pytest.raises(RetryableRunError) as busy:
        await resolver.password(credentials(ref=ccp_ref(cyberark)))
    assert busy.value.code is ErrorCode.VaultUnavailable

    cyberark.stop()
    with pytest.raises(RetryableRunError) as down:
        await resolver.password(credentials(ref=ccp_ref(cyberark)))
    assert down.value.code is ErrorCode.VaultUnavailable
