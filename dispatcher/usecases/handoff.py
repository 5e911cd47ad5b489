"""What a worker needs besides the request: the connection's secret, sealed to its machine.

The password (credentials) or access token (sign-in) is fetched at dispatch time, never
earlier, and encrypted to the receiving machine's public key with the hand-off's binding as
associated data (run, machine, fence, flow, inputs digest: ``crypto.handoff_binding``): neither
the broker nor another machine can read it, nor replay it into another run, nor put it in an
assignment whose flow or inputs were changed.
"""

from __future__ import annotations

import json

from dispatcher.codes import ErrorCode
from dispatcher.errors import RunFailure
from dispatcher.models import Connection, ConnectionKind
from dispatcher.usecases.ports import PasswordSource, Sealer, TokenSource


class Handoff:
    """Builds the sealed secret of an assignment."""

    def __init__(
        self,
        *,
        tokens: TokenSource | None,
        passwords: PasswordSource | None,
        seal: Sealer,
        token_validity_s: float,
    ) -> None:
        self.tokens = tokens
        self.passwords = passwords
        self.seal = seal
        self.token_validity_s = token_validity_s

    async def sealed_secret(self, connection: Connection, binding: str, public_key: str) -> str:
        """The connection's secret for the hand-off ``binding``, sealed to ``public_key``.

        Raises RunFailure (the run fails) or RetryableRunError (try again within the deadline).
        """
        if connection.kind is ConnectionKind.sign_in:
            if self.tokens is None:
                raise RunFailure(
                    ErrorCode.IdentityProviderMisconfigured,
                    "no identity provider is configured for sign-in connections",
                )
            token = await self.tokens.access_token(connection, self.token_validity_s)
            payload = {"kind": "access_token", "account": connection.account, "token": token}
        else:
            if self.passwords is None:
                raise RunFailure(ErrorCode.SecretNotFound, "no credential provider is configured")
            password = await self.passwords.password(connection)
            payload = {"kind": "password", "username": connection.username, "password": password}
        return self.seal(public_key, json.dumps(payload).encode(), binding)
