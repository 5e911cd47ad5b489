"""Building msal confidential-client applications the way the dispatcher needs them.

One ``httpx.Client`` (TLS trust from ``settings.idp_ca_file``; msal's own ``verify=`` is
overridden by ``REQUESTS_CA_BUNDLE`` and is not used) and one ``http_cache`` per process, shared
by every app, so that discovery is fetched once. Apps are cheap (~0.3 ms) and built per call,
each on its connection's own token cache, with the authority pinned to the connection's tenant.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from typing import Any

import httpx
import msal

from dispatcher.errors import ConfigurationError
from dispatcher.settings import Settings

HTTP_TIMEOUT_S = 10.0


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for identity-provider and vault calls (``idp_ca_file`` when set)."""
    if settings.idp_ca_file:
        return ssl.create_default_context(cafile=settings.idp_ca_file)
    return ssl.create_default_context()


class MsalHttpClient:
    """msal's HTTP client interface over ``httpx.Client``, noting each thread's last status.

    msal hides the HTTP status of some failures (a 429 comes back as a parsed body, and a
    response replayed from its throttling cache makes no request at all); the broker reads
    :meth:`last_status` to tell them apart.
    """

    def __init__(self, client: httpx.Client) -> None:
        self._client = client
        self._local = threading.local()

    def get(self, url: str, params: Any = None, headers: Any = None, **kwargs: Any) -> Any:
        """GET as msal calls it."""
        return self._note(self._client.get(url, params=params, headers=headers, **kwargs))

    def post(
        self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kwargs: Any
    ) -> Any:
        """POST as msal calls it (``data`` is a form)."""
        return self._note(
            self._client.post(url, params=params, data=data, headers=headers, **kwargs)
        )

    def _note(self, response: httpx.Response) -> httpx.Response:
        self._local.status = response.status_code
        retry_after = response.headers.get("Retry-After", "")
        self._local.retry_after = float(retry_after) if retry_after.isdigit() else None
        return response

    def reset_status(self) -> None:
        """Forget the calling thread's last status (before an msal call)."""
        self._local.status = None
        self._local.retry_after = None

    def last_status(self) -> int | None:
        """The status of the calling thread's last response, None when none was made."""
        status: int | None = getattr(self._local, "status", None)
        return status

    def last_retry_after(self) -> float | None:
        """The ``Retry-After`` seconds of the calling thread's last response, if any."""
        retry_after: float | None = getattr(self._local, "retry_after", None)
        return retry_after

    def close(self) -> None:
        """Close the underlying client."""
        self._client.close()


class DeviceFlowApp(msal.ConfidentialClientApplication):  # type: ignore[misc]
    """A confidential client that can also run the device code flow.

    msal exposes the device code flow on its public-client class only, but refresh tokens are
    bound to the kind of client that obtained them: the broker redeems them as a confidential
    client, so the sign-in must be one too. msal's own two methods work unchanged here.
    """

    DEVICE_FLOW_CORRELATION_ID = msal.PublicClientApplication.DEVICE_FLOW_CORRELATION_ID
    initiate_device_flow = msal.PublicClientApplication.initiate_device_flow
    acquire_token_by_device_flow = msal.PublicClientApplication.acquire_token_by_device_flow


class MsalAppFactory:
    """Builds msal apps for connections, sharing one HTTP client and one ``http_cache``."""

    def __init__(self, settings: Settings, http_client: httpx.Client | None = None) -> None:
        if not settings.client_id:
            raise ConfigurationError("RUNDISPATCH_CLIENT_ID is empty: sign-in connections need it")
        self._settings = settings
        self._owns_client = http_client is None
        client = http_client or httpx.Client(verify=tls_context(settings), timeout=HTTP_TIMEOUT_S)
        self.http = MsalHttpClient(client)
        self.http_cache: dict[str, Any] = {}
        self.scopes = [settings.token_scope]

    def authority(self, tenant_id: str) -> str:
        """The authority URL pinned to ``tenant_id`` (never ``common``/``organizations``)."""
        return f"{self._settings.authority_host.rstrip('/')}/{tenant_id}"

    def build(
        self, tenant_id: str, cache: msal.SerializableTokenCache, *, device_flow: bool = False
    ) -> Any:
        """A confidential client for ``tenant_id`` on ``cache`` (blocking: may fetch discovery)."""
        kind = DeviceFlowApp if device_flow else msal.ConfidentialClientApplication
        return kind(
            self._settings.client_id,
            client_credential=self._settings.client_secret.get_secret_value(),
            authority=self.authority(tenant_id),
            instance_discovery=False,
            http_client=self.http,
            http_cache=self.http_cache,
            token_cache=cache,
        )

    def close(self) -> None:
        """Close the HTTP client if this factory created it."""
        if self._owns_client:
            self.http.close()


def select_account(accounts: list[Mapping[str, Any]], tenant_id: str) -> Mapping[str, Any] | None:
    """The cached account signed in to ``tenant_id``, if any (one per connection)."""
    for account in accounts:
        if str(account.get("realm", "")).lower() == tenant_id.lower():
            return account
    return None
