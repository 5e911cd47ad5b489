"""Helpers of the identity end-to-end tests: the local identity provider and vaults as processes,
a flow program that reports a hash of the secret it was handed, and sign-in through the CLI.

``python -m tests.support.identity --cert-dir D [...]`` runs :class:`RecordingIdentityProvider`:
the local identity provider plus one admin action, ``issued``, that lists every token it issued
(so that a test can compare what a worker received with what the identity provider issued, and
look for those exact strings where they must never appear).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus

from devtools.idp import IdentityProvider
from devtools.server import AdminClient, Reply, serve_until_interrupted
from dispatcher.adapters.identity.cache_view import expire_access_tokens
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.adapters.identity.token_store import TokenStore
from dispatcher.bootstrap import runtime
from dispatcher.crypto import SecretBox
from dispatcher.models import Connection, ConnectionKind, Target
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.constants import CLIENT_ID, CLIENT_SECRET, SIGN_IN_USER, TENANT
from tests.support.processes import (
    REPO,
    new_settings,
)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the identity provider, recording what it issues --------------------------------------------
class RecordingIdentityProvider(IdentityProvider):
    """The local identity provider, remembering every token it issues (test-only admin action)."""

    admin_actions: ClassVar[frozenset[str]] = IdentityProvider.admin_actions | {"issued"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._issued: list[dict[str, Any]] = []
        self._issued_lock = threading.Lock()

    def issued(self) -> list[dict[str, Any]]:
        """Every token issued so far: ``{"kind", "token", "sha256", "at"}``, oldest first."""
        with self._issued_lock:
            return list(self._issued)

    def mint_refresh_token(
        self, tenant_id: str, username: str, client_id: str | None = None, scope: str = ""
    ) -> str:
        token = super().mint_refresh_token(tenant_id, username, client_id, scope)
        self._record({"refresh_token": token}, "minted")
        return token

    def _tokens(self, grant: Any, requested_scope: str) -> Reply:
        reply = super()._tokens(grant, requested_scope)
        self._record(json.loads(reply.body), "user")
        return reply

    def _client_token(self, tenant: str, client_id: str, scope: str) -> Reply:
        reply = super()._client_token(tenant, client_id, scope)
        self._record(json.loads(reply.body), "client")
        return reply

    def _record(self, body: dict[str, Any], grant: str) -> None:
        now = time.time()
        with self._issued_lock:
            for kind in ("access_token", "refresh_token", "id_token"):
                if kind in body:
                    token = str(body[kind])
                    self._issued.append(
                        {"kind": kind, "grant": grant, "token": token, "sha256": sha256(token)}
                        | {"at": now}
                    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.identity")
    parser.add_argument("--cert-dir", required=True)
    parser.add_argument("--client-id", default=CLIENT_ID)
    parser.add_argument("--client-secret", default=CLIENT_SECRET)
    parser.add_argument("--access-token-lifetime", type=int, default=3600)
    args = parser.parse_args(argv)
    idp = RecordingIdentityProvider(
        cert_dir=args.cert_dir,
        client_id=args.client_id,
        client_secret=args.client_secret,
        access_token_lifetime_s=args.access_token_lifetime,
    )
    return serve_until_interrupted(idp, {"url": idp.url, "ca_file": idp.ca_file})


# ---- the services as processes ------------------------------------------------------------------
@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    ca_file: str
    log: Path

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.url, self.ca_file)

    def call(self, action: str, **kwargs: Any) -> Any:
        return self.admin.call(action, **kwargs)

    def token_requests(self) -> int:
        return int(self.call("counters").get("token", 0))


@dataclass
class Services:
    """The recording identity provider, a Key Vault and a CyberArk CCP, each its own process."""

    workdir: Path
    started: dict[str, Service] = field(default_factory=dict)

    @property
    def idp(self) -> Service:
        return self.started["idp"]

    @property
    def keyvault(self) -> Service:
        return self.started["keyvault"]

    @property
    def cyberark(self) -> Service:
        return self.started["cyberark"]

    @property
    def cert_dir(self) -> Path:
        return self.workdir / "certs"

    def start(self) -> Services:
        """Start the identity provider."""
        self._launch("idp", ["-m", "tests.support.identity", "--cert-dir", str(self.cert_dir)])
        return self

    def start_vaults(self) -> Services:
        """Start a Key Vault (its tokens from the identity provider) and a CyberArk CCP."""
        authority = f"{self.idp.url}/{TENANT}"
        for kind in ("keyvault", "cyberark"):
            argv = ["-m", "devtools.vaults", "--kind", kind]
            argv += ["--cert-dir", str(self.cert_dir), "--authority", authority]
            self._launch(kind, argv, wait=False)
        for kind in ("keyvault", "cyberark"):
            self._ready(kind)
        return self

    def _launch(self, name: str, argv: list[str], wait: bool = True) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.started[name] = Service(name, process, "", "", log)
        if wait:
            self._ready(name)

    def _ready(self, name: str) -> None:
        service = self.started[name]
        assert service.process.stdout is not None
        line = service.process.stdout.readline()  # the service prints one JSON line when ready
        if not line:
            raise RuntimeError(f"{name} did not start: {service.log.read_text()[-2000:]}")
        info = json.loads(line)
        service.url, service.ca_file = info["url"], info["ca_file"]

    def stop(self) -> None:
        for service in self.started.values():
            if service.process.poll() is None:
                service.process.terminate()
        for service in self.started.values():
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
            if service.process.stdout is not None:
                service.process.stdout.close()

    def settings(self, **overrides: Any) -> Settings:
        """Test settings whose dispatchers use these services."""
        return new_settings(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            authority_host=self.idp.url,
            idp_ca_file=self.idp.ca_file,
            **overrides,
        )

    def issued(self, kind: str = "access_token", grant: str = "user") -> list[dict[str, Any]]:
        return [t for t in self.idp.call("issued") if t["kind"] == kind and t["grant"] == grant]


@contextlib.contextmanager
def running_services(workdir: Path) -> Iterator[Services]:
    """The identity provider (vaults on demand: ``start_vaults``), stopped afterwards."""
    services = Services(workdir)
    try:
        yield services.start()
    finally:
        services.stop()


# ---- the flow program -----------------------------------------------------------------------
FLOW_PROGRAM = """\
import hashlib, json, os, sys
run = json.load(sys.stdin)
secret = run["secret"]
value = secret.get("token") if secret.get("kind") == "access_token" else secret.get("password")
json.dump({
    "kind": secret.get("kind"),
    "who": secret.get("account") or secret.get("username"),
    "sha256": hashlib.sha256(value.encode()).hexdigest() if value else None,
    "length": len(value or ""),
    "inputs": run["inputs"],
    "secret_in_environment": any(
        value and value in v for v in os.environ.values()
    ),
}, sys.stdout)
"""


def flow_command(workdir: Path) -> list[str]:
    """``--command`` arguments of a worker whose flows report a hash of their secret."""
    program = workdir / "flow_program.py"
    if not program.exists():
        program.write_text(FLOW_PROGRAM)
    return ["--command", f"{sys.executable} -I -S {program}"]


# ---- the connections CLI and the token store ----------------------------------------------------
CONNECTIONS_CLI = (sys.executable, "-m", "dispatcher", "connections")


def sign_in_with_refresh_token(
    env: dict[str, str], connection_id: str, refresh_token: str
) -> subprocess.CompletedProcess[str]:
    """``python -m dispatcher connections sign-in ID --refresh-token-stdin``."""
    result = subprocess.run(
        [*CONNECTIONS_CLI, "sign-in", connection_id, "--refresh-token-stdin"],
        input=refresh_token + "\n",
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def sign_in_with_device_code(
    env: dict[str, str], connection_id: str, idp: Service, username: str
) -> subprocess.CompletedProcess[str]:
    """``connections sign-in ID``: the device code flow, the user's side approved at the IdP."""
    process = subprocess.Popen(
        [*CONNECTIONS_CLI, "sign-in", connection_id, "--timeout", "60"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        prompt = process.stdout.readline()  # "To sign in, use a web browser ... enter the code X"
        waiting = idp.call("device_codes")
        assert len(waiting) == 1 and waiting[0] in prompt, (prompt, waiting)
        assert idp.call("approve_device_code", user_code=waiting[0], username=username)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    return subprocess.CompletedProcess(process.args, 0, prompt + stdout, stderr)


async def expire_cached_access_token(settings: Settings, connection_id: str) -> None:
    """Expire the connection's cached access token in Redis, as time would."""
    async with runtime(settings, amqp=False) as rt:
        store = TokenStore(rt.redis, rt.names, SecretBox.from_settings(settings))
        connection = (await rt.fleet.load(force=True)).connections[connection_id]
        snapshot = await store.load(connection)
        assert snapshot.cache_json is not None
        await store.save_cache(connection, expire_access_tokens(snapshot.cache_json, 0))


# ---- sign-in connections in the identity tests ----------------------------------------------
def sign_in_connection(connection_id: str = "s1", tenant_id: str = TENANT) -> Connection:
    return Connection(
        connection_id=connection_id,
        owner=SIGN_IN_USER,
        kind=ConnectionKind.sign_in,
        target=Target(machine_id="m1"),
        account=SIGN_IN_USER,
        tenant_id=tenant_id,
    )


async def expire_access_token(broker: TokenBroker, connection: Connection) -> None:
    """Expire the cached access token, as time would."""
    snapshot = await broker.store.load(connection)
    assert snapshot.cache_json is not None
    await broker.store.save_cache(connection, expire_access_tokens(snapshot.cache_json, 0))


# ---- the dispatcher and workers ------------------------------------------------------------------
async def machines_online(redis: Any, settings: Settings, machine_ids: list[str]) -> bool:
    """Whether every machine has sent a heartbeat."""
    names = Names(settings.namespace)
    found = await redis.exists(*(names.machine_live(m) for m in machine_ids))
    return int(found) == len(machine_ids)


def metric_total(log_text: str, metric: str) -> float:
    """The sum of ``metric`` over its labels, scraped from the process whose log is given."""
    match = re.search(r"metrics on (http://\S+/metrics)", log_text)
    assert match, "the process did not log its metrics address"
    with urllib.request.urlopen(match.group(1), timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric + "{") or line.startswith(metric + " ")
    )


# ---- looking for secrets ------------------------------------------------------------------
def encodings(secret: str) -> dict[str, bytes]:
    """The forms a secret could take when written somewhere: plain, JSON, base64, URL-encoded."""
    raw = secret.encode()
    forms = {
        "plain": raw,
        "json": json.dumps(secret)[1:-1].encode(),
        "base64": base64.b64encode(raw),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "url": quote(secret, safe="").encode(),
        "form": quote_plus(secret).encode(),
    }
    # Unpadded base64 of a long secret stays recognisable even with different padding.
    forms["base64"] = forms["base64"].rstrip(b"=")
    return forms


def find_secrets(haystack: bytes, secrets: dict[str, str]) -> list[str]:
    """Which secrets (by label and form) occur in ``haystack``."""
    found = []
    for label, secret in secrets.items():
        for form, needle in encodings(secret).items():
            if needle and needle in haystack:
                found.append(f"{label} ({form})")
    return found


if __name__ == "__main__":
    raise SystemExit(main())
