"""Local HTTPS stand-ins for Azure Key Vault and CyberArk CCP, with their real API shapes.

- :class:`KeyVaultServer`: ``GET /secrets/{name}[/{version}]?api-version=7.4`` with a Bearer
  token → ``{"value", "id", "attributes"}``. A request without a valid token gets Key Vault's 401
  challenge (``WWW-Authenticate: Bearer authorization="<authority>", resource="<resource>"``);
  tokens come from a client-credentials grant at that authority (the local identity provider).
  Errors: 404 ``SecretNotFound``, 403 ``Forbidden``, 401 ``Unauthorized``.
- :class:`CyberArkServer`: ``GET /AIMWebService/api/Accounts?AppID=..&Safe=..&Object=..`` →
  ``{"Content", "UserName", ...}``. Errors: 404 ``APPAP004E``, 403 ``APPAP306E``, 400
  ``AIMWS030E``.

Both have settable secrets, ``fail_next``/``set_latency``, counters and the admin API.
Run ``python -m devtools.vaults --kind keyvault|cyberark --cert-dir D
[--authority URL]``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from devtools.jwt import decode_claims
from devtools.server import (
    Handler,
    LocalService,
    Reply,
    Request,
    json_reply,
    serve_until_interrupted,
)

KEY_VAULT_API_VERSION = "7.4"


def _key_vault_error(status: int, code: str, message: str, **extra: Any) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message, **extra}})


class KeyVaultServer(LocalService):
    """A local Azure Key Vault (secrets only)."""

    admin_actions: ClassVar[frozenset[str]] = frozenset(
        {"set_secret", "delete_secret", "forbid_app", "allow_app"}
    )

    def __init__(
        self, *, cert_dir: str | Path, authority: str, port: int = 0, resource: str | None = None
    ) -> None:
        super().__init__(cert_dir=cert_dir, port=port)
        self.authority = authority.rstrip("/")
        # The resource (token audience) defaults to the vault's own URL: a client may then
        # check, as Azure's SDK does, that the challenge's resource matches the vault's host.
        self.resource = (resource or self.url).rstrip("/")
        self._secrets: dict[str, tuple[str, str]] = {}  # name -> (value, version)
        self._forbidden: set[str] = set()

    def set_secret(self, name: str, value: str) -> str:
        """Create or update a secret; returns its new version."""
        version = uuid.uuid4().hex
        with self.lock:
            self._secrets[name.lower()] = (value, version)
        return version

    def delete_secret(self, name: str) -> bool:
        """Delete a secret; later reads get 404 ``SecretNotFound``."""
        with self.lock:
            return self._secrets.pop(name.lower(), None) is not None

    def forbid_app(self, app_id: str) -> None:
        """Answer 403 to tokens of ``app_id`` (no 'get' permission on secrets)."""
        with self.lock:
            self._forbidden.add(app_id)

    def allow_app(self, app_id: str) -> None:
        """Undo :meth:`forbid_app`."""
        with self.lock:
            self._forbidden.discard(app_id)

    def route(self, request: Request) -> tuple[str, Handler] | None:
        parts = request.path.strip("/").split("/")
        if request.method == "GET" and parts[0] == "secrets" and len(parts) in (2, 3):
            return "secrets", lambda r: self._get_secret(r, parts[1])
        return None

    def error_reply(self, status: int, retry_after: int | None) -> Reply:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if status == 429:
            reply = _key_vault_error(429, "Throttled", "Rate limit is exceeded.")
        else:
            reply = _key_vault_error(status, "ServiceUnavailable", "The service is unavailable.")
        reply.headers.update(headers)
        return reply

    def _get_secret(self, request: Request, name: str) -> Reply:
        if not request.query.get("api-version"):
            return _key_vault_error(400, "BadParameter", "The api-version parameter is missing.")
        claims = self._valid_claims(request.headers.get("authorization", ""))
        if claims is None:
            reply = _key_vault_error(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."
            )
            challenge = f'Bearer authorization="{self.authority}", resource="{self.resource}"'
            reply.headers["WWW-Authenticate"] = challenge
            return reply
        with self.lock:
            forbidden = claims.get("appid") in self._forbidden
            found = self._secrets.get(name.lower())
        if forbidden:
            return _key_vault_error(
                403,
                "Forbidden",
                f"The application 'appid={claims.get('appid')}' does not have secrets get "
                "permission on this key vault.",
                innererror={"code": "AccessDenied"},
            )
        if found is None:
            return _key_vault_error(
                404,
                "SecretNotFound",
                f"A secret with (name/id) {name} was not found in this key vault.",
            )
        value, version = found
        now = int(time.time())
        return json_reply(
            200,
            {
                "value": value,
                "id": f"{self.url}/secrets/{name}/{version}",
                "attributes": {"enabled": True, "created": now, "updated": now},
                "tags": {},
            },
        )

    def _valid_claims(self, authorization: str) -> dict[str, Any] | None:
        scheme, _, token = authorization.partition(" ")
        claims = decode_claims(token) if scheme.lower() == "bearer" else None
        if claims is None or str(claims.get("aud", "")).rstrip("/") != self.resource:
            return None
        if float(claims.get("exp", 0)) <= time.time():
            return None
        return claims


class CyberArkServer(LocalService):
    """A local CyberArk Central Credential Provider (the AIMWebService REST API)."""

    admin_actions: ClassVar[frozenset[str]] = frozenset(
        {"set_account", "delete_account", "deny_app"}
    )

    def __init__(self, *, cert_dir: str | Path, port: int = 0) -> None:
        super().__init__(cert_dir=cert_dir, port=port)
        self._accounts: dict[tuple[str, str], dict[str, str]] = {}
        self._denied: set[str] = set()

    def set_account(self, safe: str, object: str, content: str, username: str = "svc-user") -> None:
        """Create or update the account ``object`` of ``safe`` with password ``content``."""
        with self.lock:
            self._accounts[(safe, object)] = {"Content": content, "UserName": username}

    def delete_account(self, safe: str, object: str) -> bool:
        """Delete an account; later reads get 404 ``APPAP004E``."""
        with self.lock:
            return self._accounts.pop((safe, object), None) is not None

    def deny_app(self, app_id: str) -> None:
        """Refuse ``app_id`` (403 ``APPAP306E``), as when its machine is not allowed."""
        with self.lock:
            self._denied.add(app_id)

    def route(self, request: Request) -> tuple[str, Handler] | None:
        if request.method == "GET" and request.path.rstrip("/").lower() == (
            "/aimwebservice/api/accounts"
        ):
            return "accounts", self._get_account
        return None

    def error_reply(self, status: int, retry_after: int | None) -> Reply:
        body = {"ErrorCode": "AIMWS031E", "ErrorMsg": "Code: -1, the provider is unavailable."}
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return json_reply(status, body, headers)

    def _get_account(self, request: Request) -> Reply:
        query = {key.lower(): value for key, value in request.query.items()}
        app_id, safe, name = query.get("appid"), query.get("safe", ""), query.get("object", "")
        if not app_id:
            return json_reply(
                400,
                {"ErrorCode": "AIMWS030E", "ErrorMsg": "Invalid request. The AppID is required."},
            )
        with self.lock:
            denied = app_id in self._denied
            account = self._accounts.get((safe, name))
        if denied:
            message = f"APPAP306E Failed to verify application authentication data: {app_id}"
            return json_reply(403, {"ErrorCode": "APPAP306E", "ErrorMsg": message})
        if account is None:
            message = (
                f"APPAP004E Password object matching query [Safe={safe};Object={name}] was not "
                "found (Diagnosis: [ITATS004E] Object not found)"
            )
            return json_reply(404, {"ErrorCode": "APPAP004E", "ErrorMsg": message})
        details = {"Safe": safe, "Name": name, "Folder": "Root", "PolicyID": "WinDomain"}
        details |= {"Address": "contoso.com", "PasswordChangeInProcess": "False"}
        return json_reply(200, account | details)


def main(argv: list[str] | None = None) -> int:
    """Run one local vault until interrupted, printing its URL and CA file as JSON."""
    parser = argparse.ArgumentParser(prog="python -m devtools.vaults")
    parser.add_argument("--kind", choices=("keyvault", "cyberark"), required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert-dir", required=True)
    parser.add_argument("--authority", help="token authority for Key Vault: IdP URL + /tenant")
    args = parser.parse_args(argv)
    service: LocalService
    if args.kind == "keyvault":
        if not args.authority:
            parser.error("--authority is required for --kind keyvault")
        service = KeyVaultServer(cert_dir=args.cert_dir, port=args.port, authority=args.authority)
    else:
        service = CyberArkServer(cert_dir=args.cert_dir, port=args.port)
    return serve_until_interrupted(service, {"url": service.url, "ca_file": service.ca_file})


if __name__ == "__main__":
    raise SystemExit(main())
