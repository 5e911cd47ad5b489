"""Reading msal's serialized token cache without msal, for the fast path.

A cache hit needs no lock, no thread and no msal app: the broker decrypts the connection's
cache and looks for an access token here, using the rules msal itself applies (same client,
realm and scopes; an access token with less than 5 minutes left is expired; ``refresh_on``
passed means "refresh now"). Anything else goes to msal, under the refresh lock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MSAL_EXPIRY_MARGIN_S = 300.0  # msal treats an access token with < 5 min left as expired
REFRESH_HEADROOM_S = 60.0


@dataclass(frozen=True)
class CachedAccessToken:
    """An access token found in a cache (the secret stays out of ``repr``)."""

    secret: str = field(repr=False)
    expires_on: float
    cached_at: float
    refresh_on: float | None = None

    @property
    def lifetime_s(self) -> float:
        """How long the identity provider let this token live."""
        return self.expires_on - self.cached_at


def required_validity(valid_for_s: float, lifetime_s: float) -> float:
    """How long a cached access token must still be valid to be handed out.

    ``valid_for_s`` when a refresh can give that much; when it cannot (the caller asks for more
    than the identity provider's token lifetime), half the lifetime, so that refreshes stay one
    per half-lifetime rather than one per call. Never less than msal's 5-minute margin.
    """
    if valid_for_s <= lifetime_s - REFRESH_HEADROOM_S:
        return max(valid_for_s, MSAL_EXPIRY_MARGIN_S)
    return max(MSAL_EXPIRY_MARGIN_S, lifetime_s / 2)


def access_tokens(
    cache_json: str, *, client_id: str, tenant_id: str, scopes: list[str]
) -> list[CachedAccessToken]:
    """Access tokens of ``client_id`` in ``tenant_id`` covering ``scopes``, latest expiry first."""
    entries: dict[str, Any] = json.loads(cache_json).get("AccessToken", {})
    wanted = set(scopes)
    found = [
        CachedAccessToken(
            secret=entry["secret"],
            expires_on=float(entry["expires_on"]),
            cached_at=float(entry.get("cached_at", entry["expires_on"])),
            refresh_on=float(entry["refresh_on"]) if "refresh_on" in entry else None,
        )
        for entry in entries.values()
        if entry.get("client_id") == client_id
        and str(entry.get("realm", "")).lower() == tenant_id.lower()
        and wanted <= set(str(entry.get("target", "")).split())
    ]
    return sorted(found, key=lambda token: token.expires_on, reverse=True)


def usable_access_token(
    cache_json: str | None,
    *,
    client_id: str,
    tenant_id: str,
    scopes: list[str],
    valid_for_s: float,
    now: float,
    aging_ok: bool = False,
) -> CachedAccessToken | None:
    """The cached access token to hand out for ``valid_for_s``, or None if a refresh is due.

    ``aging_ok`` accepts a token whose ``refresh_on`` has passed (when a refresh just failed
    for now, the still-valid token is better than no token, as msal itself does).
    """
    if cache_json is None:
        return None
    for token in access_tokens(cache_json, client_id=client_id, tenant_id=tenant_id, scopes=scopes):
        if not aging_ok and token.refresh_on is not None and token.refresh_on <= now:
            continue
        if token.expires_on - now >= required_validity(valid_for_s, token.lifetime_s):
            return token
    return None


def expire_access_tokens(cache_json: str, now: float) -> str:
    """The same cache with every access token expired (tests and demos force a refresh)."""
    cache = json.loads(cache_json)
    for entry in cache.get("AccessToken", {}).values():
        entry["expires_on"] = str(int(now) - 1)
    return json.dumps(cache)
