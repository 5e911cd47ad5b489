"""The small boundaries the dispatcher depends on, as Protocols."""

from __future__ import annotations

from typing import Protocol

from dispatcher.models import Connection


class TokenSource(Protocol):
    """Access tokens of sign-in connections (the msal token broker)."""

    async def access_token(self, connection: Connection, valid_for_s: float) -> str: ...

    async def refresh_token_expiry(self, connection: Connection) -> float | None: ...


class PasswordSource(Protocol):
    """Passwords of credentials connections, resolved at dispatch time."""

    async def password(self, connection: Connection) -> str: ...


class Sealer(Protocol):
    """Encrypts a secret to one machine's public key, bound to one run."""

    def __call__(self, public_key: str, plaintext: bytes, aad: str) -> str: ...
