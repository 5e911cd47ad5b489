"""What a failed token refresh means, and what the run must do about it.

msal reports failures in three ways (a dict with ``error``, an exception, or ``None``); this
module turns them into one :class:`RefreshFailure` and then into the dispatcher's error tree:

- ``reauth_required`` / ``interaction_required`` (``invalid_grant``, revoked, expired, MFA...)
  → ``RunFailure(PasswordlessTokenExpiry)``, and the connection is marked so later runs fail
  fast without calling the identity provider;
- ``client_config`` (``invalid_client``, ``unauthorized_client``...) →
  ``RunFailure(IdentityProviderMisconfigured)``: operators must act, not the user;
- ``tenant_mismatch`` (the cached account is in another tenant; found before any request) →
  ``RunFailure(TenantMismatchForConnectWithSignIn)``;
- ``unavailable`` (5xx, 429, network, a body that is not JSON) →
  :class:`IdentityProviderBusy` (a ``RetryableRunError``): retry within the run's deadline.

Classification follows ``error`` (and msal's ``classification``), never AADSTS numbers, which
Microsoft says not to depend on; the numbers only go into messages. Messages never carry a token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from msal.exceptions import MsalServiceError

from dispatcher.codes import ErrorCode
from dispatcher.errors import IdentityProviderBusy, RetryableRunError, RunFailure

REAUTH_REQUIRED = "reauth_required"
INTERACTION_REQUIRED = "interaction_required"
CLIENT_CONFIG = "client_config"
TENANT_MISMATCH = "tenant_mismatch"
UNAVAILABLE = "unavailable"

_INTERACTION_ERRORS = frozenset({"interaction_required", "consent_required", "login_required"})
_CLIENT_ERRORS = frozenset(
    {"invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"}
)
_TRANSIENT_ERRORS = frozenset(
    {"temporarily_unavailable", "server_error", "too_many_requests", "throttled"}
)


@dataclass(frozen=True)
class RefreshFailure:
    """A classified refresh failure (safe to store and show: it holds no token)."""

    kind: str
    error: str
    error_codes: tuple[int, ...] = ()
    detail: str = ""
    retry_after_s: float | None = None

    @property
    def marks_connection(self) -> bool:
        """Whether the connection is broken until it is signed in again."""
        return self.kind in (REAUTH_REQUIRED, INTERACTION_REQUIRED)

    def describe(self) -> str:
        """One line for run errors and ``connections show``."""
        codes = ", ".join(f"AADSTS{code}" for code in self.error_codes)
        cause = f"{self.error}, {codes}" if codes else self.error
        if self.kind == REAUTH_REQUIRED:
            return f"the identity provider refused the refresh token ({cause}): sign in again"
        if self.kind == INTERACTION_REQUIRED:
            return f"the account must sign in interactively ({cause}): sign in again"
        if self.kind == CLIENT_CONFIG:
            return f"the identity provider rejected the dispatcher's client ({cause})"
        if self.kind == TENANT_MISMATCH:
            return "the connection was signed in to another tenant than its own"
        return f"the identity provider is unavailable ({self.detail or cause})"

    def to_error(self) -> RunFailure | RetryableRunError:
        """The exception the run gets."""
        if self.kind == UNAVAILABLE:
            return IdentityProviderBusy(self.describe(), self.retry_after_s)
        code = {
            CLIENT_CONFIG: ErrorCode.IdentityProviderMisconfigured,
            TENANT_MISMATCH: ErrorCode.TenantMismatchForConnectWithSignIn,
        }.get(self.kind, ErrorCode.PasswordlessTokenExpiry)
        return RunFailure(code, self.describe(), {"error": self.error, "kind": self.kind})

    def to_marker(self, at: float) -> dict[str, str]:
        """The token-state fields that mark the connection."""
        return {
            "error": self.error,
            "error_kind": self.kind,
            "error_codes": ",".join(str(code) for code in self.error_codes),
            "error_at": f"{at:.3f}",
        }

    @classmethod
    def from_marker(cls, fields: Mapping[str, str]) -> RefreshFailure:
        """Rebuild the failure recorded by :meth:`to_marker`."""
        codes = tuple(int(code) for code in fields.get("error_codes", "").split(",") if code)
        return cls(fields.get("error_kind", REAUTH_REQUIRED), fields["error"], codes)


def classify_result(
    result: Mapping[str, Any], status: int | None, retry_after_s: float | None = None
) -> RefreshFailure:
    """Classify an msal error dict; ``status`` is the HTTP status when a request was made."""
    error = str(result.get("error", "unknown_error"))
    codes = tuple(int(c) for c in result.get("error_codes", ()) if isinstance(c, int))
    if (status is not None and (status == 429 or status >= 500)) or error in _TRANSIENT_ERRORS:
        detail = f"HTTP {status}" if status is not None else error
        return RefreshFailure(UNAVAILABLE, error, codes, detail, retry_after_s)
    if error == "invalid_grant":
        # msal sets "classification" from a suberror (bad_token, basic_action ...); a kept,
        # non-empty one means the user must interact (MFA, consent, policy).
        kind = INTERACTION_REQUIRED if result.get("classification") else REAUTH_REQUIRED
        return RefreshFailure(kind, error, codes)
    if error in _INTERACTION_ERRORS:
        return RefreshFailure(INTERACTION_REQUIRED, error, codes)
    return RefreshFailure(CLIENT_CONFIG, error, codes)


def classify_exception(exc: BaseException, status: int | None) -> RefreshFailure | None:
    """Classify an exception msal raised; None when it is not an identity-provider failure."""
    if isinstance(exc, MsalServiceError):
        if status is None:
            # No request left this call: msal replayed a recent 5xx/429 from its throttling
            # cache (it holds requests for Retry-After, 5 s by default). Retry later.
            return RefreshFailure(UNAVAILABLE, "throttled", detail="recent failure, held by msal")
        return RefreshFailure(UNAVAILABLE, "server_error", detail=f"HTTP {status}")
    if isinstance(exc, httpx.TransportError):
        return RefreshFailure(UNAVAILABLE, "network", detail=f"network: {type(exc).__name__}")
    if isinstance(exc, json.JSONDecodeError):
        return RefreshFailure(UNAVAILABLE, "bad_response", detail=f"non-JSON answer, HTTP {status}")
    return None
