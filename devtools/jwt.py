"""Unsigned JWTs (``alg: none``), as the local services issue them.

msal only decodes id_tokens and never checks a signature, and the local vault only needs to
read an access token's audience and expiry: signing would add nothing but code.
"""

from __future__ import annotations

import base64
import json
from typing import Any


def b64url(data: bytes) -> str:
    """Base64url without padding (JWT and client_info encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A JWT with ``alg: none`` carrying ``claims``."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def decode_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, or None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None
