"""Passwords of ``credentials`` connections, resolved at dispatch time and never cached.

Three sources (SPEC §3): stored (``password_sealed``, opened with the :class:`SecretBox`, bound
to the connection id), Azure Key Vault (REST, with a bearer token from a client-credentials
grant), CyberArk CCP (REST). Failures map to run errors:

- not found → ``RunFailure(SecretNotFound)``; 401/403 → ``RunFailure(SecretAccessDenied)``;
- 5xx, 429, network, unreadable answer → ``RetryableRunError(VaultUnavailable)``.

Key Vault authentication follows Azure's SDK: the first request gets the vault's 401 challenge,
which names the tenant and the token audience; the token is asked from the configured authority
host only (the client secret never goes where the vault points), and the challenge's audience
must belong to the vault's own domain. Bearer tokens are cached until shortly before expiry;
passwords never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from dispatcher.adapters.identity.msal_app import HTTP_TIMEOUT_S, tls_context
from dispatcher.codes import ErrorCode
from dispatcher.crypto import SecretBox
from dispatcher.errors import RetryableRunError, RunFailure, SealedDataError
from dispatcher.models import Connection, SecretRef
from dispatcher.settings import Settings

KEY_VAULT_API_VERSION = "7.4"
TOKEN_EARLY_RENEWAL_S = 60.0
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,127}$")


@dataclass(frozen=True)
class VaultAccess:
    """How the dispatcher authenticates to Azure Key Vault (client credentials)."""

    authority_host: str
    client_id: str
    client_secret: str = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultAccess:
        """The dispatcher's own app registration and authority host."""
        return cls(
            settings.authority_host.rstrip("/"),
            settings.client_id,
            settings.client_secret.get_secret_value(),
        )


def _unavailable(what: str) -> RetryableRunError:
    return RetryableRunError(ErrorCode.VaultUnavailable, f"{what} is unavailable")


class CredentialResolver:
    """Resolves a credentials connection's password from its source, at call time."""

    def __init__(
        self,
        settings: Settings,
        box: SecretBox,
        *,
        http_client_factory: Callable[[], httpx.AsyncClient] | None = None,
        access: VaultAccess | None = None,
    ) -> None:
        self._box = box
        self._access = access or VaultAccess.from_settings(settings)
        self._factory = http_client_factory or (
            lambda: httpx.AsyncClient(verify=tls_context(settings), timeout=HTTP_TIMEOUT_S)
        )
        self._client: httpx.AsyncClient | None = None
        self._challenges: dict[str, tuple[str, str]] = {}  # vault -> (tenant, scope)
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._token_lock = asyncio.Lock()
        self._closing: asyncio.Task[None] | None = None

    async def password(self, connection: Connection) -> str:
        """The connection's password, fetched now from where it lives."""
        if connection.password_sealed is not None:
            try:
                return self._box.open_text(connection.password_sealed, connection.connection_id)
            except SealedDataError:
                raise RunFailure(
                    ErrorCode.SecretAccessDenied,
                    "the stored password does not open with the configured secret keys",
                ) from None
        ref = connection.secret_ref
        if ref is None:
            raise RunFailure(ErrorCode.SecretNotFound, "the connection has no password source")
        if ref.provider == "azure_key_vault":
            return await self._key_vault(ref)
        return await self._cyberark(ref)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """Synchronous close for shutdown hooks: schedules :meth:`aclose` on the running loop."""
        with contextlib.suppress(RuntimeError):  # no running loop: the process is ending
            self._closing = asyncio.get_running_loop().create_task(self.aclose())

    # ---- Azure Key Vault --------------------------------------------------------------------
    async def _key_vault(self, ref: SecretRef) -> str:
        if not ref.secret_name:
            raise RunFailure(ErrorCode.SecretNotFound, "the Key Vault reference has no secret_name")
        vault = ref.vault_url.rstrip("/")
        url = f"{vault}/secrets/{quote(ref.secret_name, safe='')}"
        params = {"api-version": KEY_VAULT_API_VERSION}
        headers: dict[str, str] | None = None
        if challenge := self._challenges.get(vault):
            headers = {"Authorization": f"Bearer {await self._bearer_token(*challenge)}"}
        response = await self._get(url, params, "the Key Vault", headers)
        if response.status_code == 401:
            # No token yet, or the vault refused the cached one: answer its challenge once.
            challenge = self._challenge(vault, response)
            self._challenges[vault] = challenge
            token = await self._bearer_token(*challenge, renew=headers is not None)
            headers = {"Authorization": f"Bearer {token}"}
            response = await self._get(url, params, "the Key Vault", headers)
        if response.status_code == 200:
            return str(_json(response, "the Key Vault")["value"])
        code = _json_or_empty(response).get("error", {}).get("code", "")
        raise _failure(response.status_code, f"Key Vault secret {ref.secret_name!r}", code)

    def _challenge(self, vault: str, response: httpx.Response) -> tuple[str, str]:
        """(tenant, scope) from the vault's ``WWW-Authenticate`` challenge, checked."""
        params = dict(_CHALLENGE_PARAM.findall(response.headers.get("WWW-Authenticate", "")))
        authority = params.get("authorization") or params.get("authorization_uri") or ""
        resource = params.get("resource") or params.get("scope", "").removesuffix("/.default")
        tenant = urlsplit(authority).path.strip("/").split("/")[0]
        vault_host = urlsplit(vault).hostname or ""
        resource_host = urlsplit(resource).hostname or ""
        if (
            not _TENANT.match(tenant)
            or not resource_host
            or not (vault_host == resource_host or vault_host.endswith("." + resource_host))
        ):
            raise RunFailure(
                ErrorCode.SecretAccessDenied, "the Key Vault's authentication challenge is invalid"
            )
        return tenant, f"{resource.rstrip('/')}/.default"

    async def _bearer_token(self, tenant: str, scope: str, renew: bool = False) -> str:
        async with self._token_lock:
            cached = self._tokens.get((tenant, scope))
            if cached and not renew and cached[1] - time.time() > TOKEN_EARLY_RENEWAL_S:
                return cached[0]
            url = f"{self._access.authority_host}/{tenant}/oauth2/v2.0/token"
            form = {
                "grant_type": "client_credentials",
                "client_id": self._access.client_id,
                "client_secret": self._access.client_secret,
                "scope": scope,
            }
            response = await self._send("POST", url, "the identity provider", data=form)
            body = _json(response, "the identity provider")
            if response.status_code != 200 or "access_token" not in body:
                if response.status_code == 429 or response.status_code >= 500:
                    raise _unavailable("the identity provider (vault token)")
                raise RunFailure(
                    ErrorCode.SecretAccessDenied,
                    f"the identity provider refused a vault token ({body.get('error', 'error')})",
                )
            token = str(body["access_token"])
            expires_at = time.time() + float(body.get("expires_in", 300))
            self._tokens[(tenant, scope)] = (token, expires_at)
            return token

    # ---- CyberArk CCP -----------------------------------------------------------------------
    async def _cyberark(self, ref: SecretRef) -> str:
        if not (ref.app_id and ref.safe and ref.object):
            raise RunFailure(
                ErrorCode.SecretNotFound, "the CyberArk reference needs app_id, safe and object"
            )
        url = f"{ref.vault_url.rstrip('/')}/AIMWebService/api/Accounts"
        params = {"AppID": ref.app_id, "Safe": ref.safe, "Object": ref.object}
        response = await self._get(url, params, "CyberArk")
        if response.status_code == 200:
            return str(_json(response, "CyberArk")["Content"])
        code = str(_json_or_empty(response).get("ErrorCode", ""))
        raise _failure(response.status_code, f"CyberArk account {ref.safe}/{ref.object}", code)

    # ---- HTTP -------------------------------------------------------------------------------
    async def _get(
        self,
        url: str,
        params: dict[str, str],
        what: str,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self._send("GET", url, what, params=params, headers=headers)

    async def _send(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        if self._client is None:
            self._client = self._factory()
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(f"{what} ({type(exc).__name__})") from None


def _failure(status: int, what: str, code: str) -> RunFailure | RetryableRunError:
    """The run error for a vault's non-200 answer (``code`` is the vault's error code)."""
    reason = f"HTTP {status}" + (f", {code}" if code else "")
    if status == 429 or status >= 500:
        return _unavailable(f"the vault ({reason})")
    if status in (401, 403):
        return RunFailure(ErrorCode.SecretAccessDenied, f"access to {what} was denied ({reason})")
    if status == 404:
        return RunFailure(ErrorCode.SecretNotFound, f"{what} was not found ({reason})")
    return RunFailure(ErrorCode.SecretNotFound, f"the vault refused to look up {what} ({reason})")


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise _unavailable(f"{what} (answer is not JSON, HTTP {response.status_code})") from None
    if not isinstance(body, dict):
        raise _unavailable(f"{what} (unexpected answer)")
    return body


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
