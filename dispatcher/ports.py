"""The small boundaries the dispatcher depends on, as Protocols."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dispatcher.models import Connection


class TokenSource(Protocol):
    """Access tokens of sign-in connections (the msal token broker)."""

    async def access_token(self, connection: Connection, valid_for_s: float) -> str: ...

    async def refresh_token_expiry(self, connection: Connection) -> float | None: ...


class PasswordSource(Protocol):
    """Passwords of credentials connections, resolved at dispatch time."""

    async def password(self, connection: Connection) -> str: ...


# Encrypts a secret to one machine's public key, bound to one run (public key, plaintext, aad).
Sealer = Callable[[str, bytes, str], str]


class Delivery(Protocol):
    """What the data path reads of an AMQP delivery (the consumer adapter owns acking)."""

    @property
    def body(self) -> bytes: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def content_encoding(self) -> str | None: ...

    @property
    def routing_key(self) -> str | None: ...

    @property
    def type(self) -> str | None: ...
