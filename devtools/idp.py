"""A local, Entra-shaped identity provider over HTTPS, for tests and demos.

Serves what msal's ``ConfidentialClientApplication`` needs (``instance_discovery=False``):

- ``GET  /<tenant>/v2.0/.well-known/openid-configuration``
- ``POST /<tenant>/oauth2/v2.0/token``: ``refresh_token``, ``authorization_code``,
  ``device_code`` and ``client_credentials`` grants; rotating refresh tokens, ``client_info``,
  unsigned id_tokens, Entra error bodies (``AADSTSnnnn``)
- ``POST /<tenant>/oauth2/v2.0/devicecode`` and the user's side, ``GET|POST /devicelogin``
- ``GET  /<tenant>/oauth2/v2.0/authorize`` (with ``login_hint``: signs in at once and redirects)

Failures to switch on: :meth:`revoke_user` (``invalid_grant`` AADSTS50173),
:meth:`expire_refresh_tokens` (AADSTS700082), ``fail_next`` (503/429/HTML), wrong client secret
(``invalid_client``), ``set_latency``. Run ``python -m devtools.idp --port P
--cert-dir D``; the admin API (see :mod:`devtools.server`) drives it from elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

from devtools.idp_grants import Grant, GrantStore, PendingCode
from devtools.jwt import b64url, unsigned_jwt
from devtools.server import (
    Handler,
    LocalService,
    Reply,
    Request,
    json_reply,
    serve_until_interrupted,
)
from devtools.user_pages import DevicePages

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})


def entra_error(
    status: int, error: str, code: int, text: str, suberror: str | None = None
) -> Reply:
    """A token-endpoint error with Entra's body shape."""
    body: dict[str, Any] = {
        "error": error,
        "error_description": f"AADSTS{code}: {text} Trace ID: {uuid.uuid4()}",
        "error_codes": [code],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
        "error_uri": "https://login.microsoftonline.com/error?code=" + str(code),
    }
    if suberror:
        body["suberror"] = suberror
    return json_reply(status, body)


class IdentityProvider(DevicePages, LocalService):
    """The local identity provider; every public method is also an admin action."""

    admin_actions: ClassVar[frozenset[str]] = frozenset(
        {
            "mint_refresh_token",
            "revoke_user",
            "expire_refresh_tokens",
            "set_client",
            "set_lifetimes",
            "approve_device_code",
            "device_codes",
        }
    )

    def __init__(
        self,
        *,
        cert_dir: str | Path,
        port: int = 0,
        client_id: str = "rundispatch-local",
        client_secret: str = "local-secret",
        access_token_lifetime_s: int = 3600,
        refresh_token_lifetime_s: int = 90 * 86400,
        refresh_in_s: int | None = None,
        reuse_detection: bool = False,
        device_code_interval_s: int = 1,
    ) -> None:
        super().__init__(cert_dir=cert_dir, port=port)
        self.clients: dict[str, str] = {client_id: client_secret}
        self.reuse_detection = reuse_detection
        self.device_code_interval_s = device_code_interval_s
        self.access_token_lifetime_s = access_token_lifetime_s
        self.refresh_token_lifetime_s = refresh_token_lifetime_s
        self.refresh_in_s = refresh_in_s
        self.set_lifetimes(access_token_lifetime_s, refresh_token_lifetime_s, refresh_in_s)
        self.grants = GrantStore()

    # ---- control ----------------------------------------------------------------------------
    def set_client(self, client_id: str, client_secret: str) -> None:
        """Register a client, or change its secret (the old one then gets ``invalid_client``)."""
        with self.lock:
            self.clients[client_id] = client_secret

    def set_lifetimes(
        self,
        access_token_s: int,
        refresh_token_s: int | None = None,
        refresh_in_s: int | None = None,
    ) -> None:
        """Lifetimes of new tokens; msal counts an access token with < 300 s left as expired."""
        if access_token_s <= 300:
            raise ValueError("access tokens must live more than 300 s (msal's expiry margin)")
        with self.lock:
            self.access_token_lifetime_s = int(access_token_s)
            if refresh_token_s is not None:
                self.refresh_token_lifetime_s = int(refresh_token_s)
            self.refresh_in_s = refresh_in_s

    def mint_refresh_token(
        self, tenant_id: str, username: str, client_id: str | None = None, scope: str = ""
    ) -> str:
        """A refresh token for ``username``, as if the user had just signed in (test seeding)."""
        with self.lock:
            client = client_id or next(iter(self.clients))
            grant = self.grants.new_grant(tenant_id, client, username, scope)
            return self.grants.new_refresh_token(grant, self.refresh_token_lifetime_s)

    def revoke_user(self, username: str) -> int:
        """Revoke every grant of ``username`` (AADSTS50173); returns how many."""
        with self.lock:
            return self.grants.set_status(username, "revoked")

    def expire_refresh_tokens(self, username: str) -> int:
        """Expire every grant of ``username`` (AADSTS700082); returns how many."""
        with self.lock:
            return self.grants.set_status(username, "expired")

    def approve_device_code(self, user_code: str, username: str) -> bool:
        """The user's side of the device code flow: sign ``username`` in for ``user_code``."""
        with self.lock:
            return self.grants.approve(user_code, username)

    def device_codes(self) -> list[str]:
        """User codes waiting for approval (what a user would read off a terminal)."""
        with self.lock:
            return self.grants.waiting_user_codes()

    # ---- routing ----------------------------------------------------------------------------
    def route(self, request: Request) -> tuple[str, Handler] | None:
        parts = request.path.strip("/").split("/")
        if request.path.rstrip("/") == "/devicelogin":
            return "devicelogin", self.device_login_page
        if len(parts) < 2:
            return None
        tenant, rest = parts[0], "/".join(parts[1:])
        if rest == "v2.0/.well-known/openid-configuration":
            return "discovery", lambda r: self._discovery(tenant)
        if rest == "oauth2/v2.0/token" and request.method == "POST":
            return "token", lambda r: self._token(tenant, r)
        if rest == "oauth2/v2.0/devicecode" and request.method == "POST":
            return "devicecode", lambda r: self._device_code(tenant, r)
        if rest == "oauth2/v2.0/authorize":
            return "authorize", lambda r: self._authorize(tenant, r)
        return None

    def error_reply(self, status: int, retry_after: int | None) -> Reply:
        reply = (
            entra_error(status, "too_many_requests", 50196, "Too many requests.")
            if status == 429
            else entra_error(status, "temporarily_unavailable", 90033, "Service unavailable.")
        )
        if retry_after is not None:
            reply.headers["Retry-After"] = str(retry_after)
        return reply

    def _discovery(self, tenant: str) -> Reply:
        base = f"{self.url}/{tenant}"
        return json_reply(
            200,
            {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_GRANT],
                "token_endpoint_auth_methods_supported": ["client_secret_post"],
                "tenant_region_scope": "EU",
            },
        )

    # ---- token endpoint ---------------------------------------------------------------------
    def _token(self, tenant: str, request: Request) -> Reply:
        form = request.form()
        client_id = form.get("client_id", "")
        with self.lock:
            if client_id not in self.clients:
                return entra_error(
                    400, "unauthorized_client", 700016, f"Application '{client_id}' not found."
                )
            if "client_secret" in form and form["client_secret"] != self.clients[client_id]:
                return entra_error(401, "invalid_client", 7000215, "Invalid client secret.")
            grant_type = form.get("grant_type", "")
            if grant_type == "refresh_token":
                return self._redeem_refresh_token(tenant, form)
            if grant_type == "authorization_code":
                return self._redeem_code(self.grants.auth_codes, form.get("code", ""), tenant, form)
            if grant_type == DEVICE_GRANT:
                return self._redeem_device_code(tenant, form)
            if grant_type == "client_credentials":
                return self._client_token(tenant, client_id, form.get("scope", ""))
        return entra_error(400, "unsupported_grant_type", 70003, "Unsupported grant type.")

    def _redeem_refresh_token(self, tenant: str, form: dict[str, str]) -> Reply:
        token = self.grants.refresh_tokens.get(form.get("refresh_token", ""))
        if token is None:
            return entra_error(400, "invalid_grant", 9002313, "Invalid request.")
        grant = token.grant
        if grant.client_id != form.get("client_id"):
            return entra_error(400, "invalid_grant", 70000, "Grant issued to another client.")
        if grant.tenant_id != tenant:
            return entra_error(400, "invalid_grant", 50020, "User does not exist in tenant.")
        if grant.status == "revoked":
            return entra_error(400, "invalid_grant", 50173, "The provided grant was revoked.")
        if grant.status == "expired" or token.expires_at < time.time():
            return entra_error(
                400, "invalid_grant", 700082, "The refresh token has expired due to inactivity."
            )
        if token.used and self.reuse_detection:
            grant.status = "revoked"  # strict rotation: reuse revokes the whole grant
            return entra_error(400, "invalid_grant", 50173, "Refresh token was already used.")
        token.used = True
        return self._tokens(grant, form.get("scope", grant.scope))

    def _redeem_device_code(self, tenant: str, form: dict[str, str]) -> Reply:
        pending = self.grants.device_codes.get(form.get("device_code", ""))
        if pending is None or pending.tenant_id != tenant:
            return entra_error(400, "invalid_grant", 70000, "Unknown device code.")
        if pending.expires_at < time.time():
            return entra_error(400, "expired_token", 70020, "The device code expired.")
        if pending.username is None:
            return entra_error(400, "authorization_pending", 70016, "Waiting for the user.")
        return self._redeem_code(self.grants.device_codes, form["device_code"], tenant, form)

    def _redeem_code(
        self, codes: dict[str, PendingCode], code: str, tenant: str, form: dict[str, str]
    ) -> Reply:
        pending = codes.pop(code, None)
        if pending is None or pending.username is None or pending.tenant_id != tenant:
            return entra_error(400, "invalid_grant", 70000, "Invalid or used code.")
        if pending.client_id != form.get("client_id"):
            return entra_error(400, "invalid_grant", 70000, "Code issued to another client.")
        if pending.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            if b64url(hashlib.sha256(verifier.encode()).digest()) != pending.code_challenge:
                return entra_error(400, "invalid_grant", 501481, "Code verifier mismatch.")
        grant = self.grants.new_grant(tenant, pending.client_id, pending.username, pending.scope)
        return self._tokens(grant, pending.scope)

    def _client_token(self, tenant: str, client_id: str, scope: str) -> Reply:
        resource = scope.split(maxsplit=1)[0].removesuffix("/.default") if scope else ""
        now = int(time.time())
        claims = {"aud": resource, "appid": client_id, "tid": tenant, "iat": now}
        claims |= {"exp": now + self.access_token_lifetime_s, "uti": secrets.token_urlsafe(8)}
        body = {
            "token_type": "Bearer",
            "expires_in": self.access_token_lifetime_s,
            "ext_expires_in": self.access_token_lifetime_s,
            "access_token": unsigned_jwt(claims),
        }
        return json_reply(200, body)

    # ---- issuing ----------------------------------------------------------------------------
    def _tokens(self, grant: Grant, requested_scope: str) -> Reply:
        scope = " ".join(s for s in requested_scope.split() if s not in OIDC_SCOPES)
        now = int(time.time())
        lifetime = self.access_token_lifetime_s
        identity: dict[str, Any] = {"tid": grant.tenant_id, "oid": grant.oid, "sub": grant.oid}
        access = identity | {
            "aud": scope.split(maxsplit=1)[0].removesuffix("/.default") if scope else ""
        }
        access |= {"scp": scope, "upn": grant.username, "appid": grant.client_id}
        access |= {"iat": now, "exp": now + lifetime, "uti": secrets.token_urlsafe(8)}
        id_claims = identity | {"preferred_username": grant.username, "name": grant.username}
        id_claims |= {"aud": grant.client_id, "iat": now, "exp": now + lifetime, "ver": "2.0"}
        id_claims["iss"] = f"{self.url}/{grant.tenant_id}/v2.0"
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": scope,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": unsigned_jwt(access),
            "refresh_token": self.grants.new_refresh_token(grant, self.refresh_token_lifetime_s),
            "refresh_token_expires_in": self.refresh_token_lifetime_s,
            "id_token": unsigned_jwt(id_claims),
            "client_info": b64url(f'{{"uid":"{grant.oid}","utid":"{grant.tenant_id}"}}'.encode()),
        }
        if self.refresh_in_s is not None:
            body["refresh_in"] = self.refresh_in_s
        return json_reply(200, body)

    # ---- device code and authorize ----------------------------------------------------------
    def _device_code(self, tenant: str, request: Request) -> Reply:
        form = request.form()
        with self.lock:
            if form.get("client_id", "") not in self.clients:
                return entra_error(400, "unauthorized_client", 700016, "Application not found.")
            device_code, user_code = self.grants.new_device_code(
                PendingCode(tenant, form["client_id"], form.get("scope", ""), time.time() + 900)
            )
        uri = f"{self.url}/devicelogin"
        message = f"To sign in, use a web browser to open the page {uri} and enter the code "
        return json_reply(
            200,
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": uri,
                "expires_in": 900,
                "interval": self.device_code_interval_s,
                "message": message + f"{user_code} to authenticate.",
            },
        )

    def _authorize(self, tenant: str, request: Request) -> Reply:
        query = request.query
        username = query.get("login_hint")
        if not username or query.get("client_id") not in self.clients:
            return json_reply(400, {"error": "invalid_request", "hint": "pass login_hint"})
        pending = PendingCode(tenant, query["client_id"], query.get("scope", ""), time.time() + 600)
        pending.username, pending.code_challenge = username, query.get("code_challenge")
        with self.lock:
            code = self.grants.new_auth_code(pending)
        params = {"code": code, "state": query.get("state", ""), "session_state": uuid.uuid4().hex}
        location = f"{query.get('redirect_uri', '')}?{urlencode(params)}"
        return Reply(302, b"", "text/plain", {"Location": location})


def main(argv: list[str] | None = None) -> int:
    """Run the identity provider until interrupted, printing its URL and CA file."""
    parser = argparse.ArgumentParser(prog="python -m devtools.idp")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert-dir", required=True)
    parser.add_argument("--client-id", default="rundispatch-local")
    parser.add_argument("--client-secret", default="local-secret")
    parser.add_argument("--access-token-lifetime", type=int, default=3600)
    parser.add_argument("--reuse-detection", action="store_true")
    args = parser.parse_args(argv)
    idp = IdentityProvider(
        cert_dir=args.cert_dir,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        access_token_lifetime_s=args.access_token_lifetime,
        reuse_detection=args.reuse_detection,
    )
    return serve_until_interrupted(idp, {"url": idp.url, "ca_file": idp.ca_file})


if __name__ == "__main__":
    raise SystemExit(main())
