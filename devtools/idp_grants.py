"""What the local identity provider remembers: grants, refresh tokens, pending codes.

Plain in-memory state; the identity provider holds its lock around every call.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass


@dataclass
class Grant:
    """What a user consented to: every refresh token of one sign-in belongs to one grant."""

    grant_id: str
    tenant_id: str
    client_id: str
    username: str
    oid: str
    scope: str
    status: str = "active"  # active | revoked | expired


@dataclass
class RefreshToken:
    grant: Grant
    expires_at: float
    used: bool = False


@dataclass
class PendingCode:
    """An authorization code or a device code waiting to be redeemed."""

    tenant_id: str
    client_id: str
    scope: str
    expires_at: float
    username: str | None = None
    code_challenge: str | None = None


class GrantStore:
    """Grants, refresh tokens, authorization codes and device codes of the identity provider."""

    def __init__(self) -> None:
        self.grants: list[Grant] = []
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.auth_codes: dict[str, PendingCode] = {}
        self.device_codes: dict[str, PendingCode] = {}
        self.user_codes: dict[str, str] = {}  # user code -> device code

    def new_grant(self, tenant_id: str, client_id: str, username: str, scope: str) -> Grant:
        """A new grant; the user's object id is stable per tenant and username."""
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant_id}/{username.lower()}"))
        grant = Grant(secrets.token_hex(8), tenant_id, client_id, username, oid, scope)
        self.grants.append(grant)
        return grant

    def new_refresh_token(self, grant: Grant, lifetime_s: float) -> str:
        """A new opaque refresh token of ``grant``."""
        value = "rt." + secrets.token_urlsafe(40)
        self.refresh_tokens[value] = RefreshToken(grant, time.time() + lifetime_s)
        return value

    def set_status(self, username: str, status: str) -> int:
        """Set the status of every grant of ``username``; returns how many."""
        matching = [g for g in self.grants if g.username.lower() == username.lower()]
        for grant in matching:
            grant.status = status
        return len(matching)

    def new_auth_code(self, pending: PendingCode) -> str:
        """An authorization code for a signed-in user."""
        code = secrets.token_urlsafe(32)
        self.auth_codes[code] = pending
        return code

    def new_device_code(self, pending: PendingCode) -> tuple[str, str]:
        """A (device code, user code) pair waiting for the user."""
        device_code, user_code = secrets.token_urlsafe(32), secrets.token_hex(4).upper()
        self.device_codes[device_code] = pending
        self.user_codes[user_code] = device_code
        return device_code, user_code

    def approve(self, user_code: str, username: str) -> bool:
        """Sign ``username`` in for ``user_code``; False when the code is unknown or expired."""
        pending = self.device_codes.get(self.user_codes.get(user_code.strip().upper(), ""))
        if pending is None or pending.expires_at < time.time():
            return False
        pending.username = username
        return True

    def waiting_user_codes(self) -> list[str]:
        """User codes that no one has approved yet."""
        now = time.time()
        return [
            user_code
            for user_code, device_code in self.user_codes.items()
            if (pending := self.device_codes.get(device_code)) is not None
            and pending.username is None
            and pending.expires_at > now
        ]
