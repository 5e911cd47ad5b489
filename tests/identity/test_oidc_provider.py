"""Optional: refresh against a real, strict-rotation OpenID provider (npm ``oidc-provider``).

With rotation, reusing a refresh token revokes the whole grant, so a single uncoordinated
concurrent refresh would break the connection for good: the broker must make exactly one token
request per expiry. Skipped when node/npm are missing or the package cannot be installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devtools.tls import ensure_certificate
from dispatcher.adapters.identity.sign_in import import_refresh_token
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.crypto import SecretBox
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.constants import CLIENT_ID, CLIENT_SECRET, SIGN_IN_USER, TENANT
from tests.support.identity import expire_access_token, sign_in_connection
from tests.support.required import missing

pytestmark = pytest.mark.integration

PACKAGE = "oidc-provider@9.13.3"
INSTALL_DIR = Path(
    os.environ.get("RUNDISPATCH_OIDC_PROVIDER_DIR", "/tmp/rundispatch-oidc-provider")
)
SERVER = Path(__file__).parent / "node" / "server.mjs"


def _installed() -> bool:
    if (INSTALL_DIR / "node_modules" / "oidc-provider").is_dir():
        return True
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--save-exact", PACKAGE],
            cwd=INSTALL_DIR,
            capture_output=True,
            timeout=90,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return (INSTALL_DIR / "node_modules" / "oidc-provider").is_dir()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def node_idp(cert_dir: Path) -> Iterator[str]:
    if not (shutil.which("node") and shutil.which("npm")):
        missing("node and npm are not installed (apt-get install nodejs npm)")
    if not _installed():
        missing(f"could not install {PACKAGE} with npm")
    shutil.copy(SERVER, INSTALL_DIR / "server.mjs")
    cert, key = ensure_certificate(cert_dir)
    port = _free_port()
    args = [str(port), str(cert), str(key), TENANT, CLIENT_ID, CLIENT_SECRET]
    process = subprocess.Popen(
        ["node", "server.mjs", *args],
        cwd=INSTALL_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield f"https://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def _get(url: str, ca_file: str) -> dict[str, object]:
    context = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


@pytest.fixture
async def node_settings(node_idp: str, cert_dir: Path, namespace: str) -> Settings:
    return Settings(
        namespace=namespace,
        secret_keys=f"k1:{SecretBox.generate_key()}",
        authority_host=node_idp,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        idp_ca_file=str(ensure_certificate(cert_dir)[0]),
        token_scope="flows.execute",
    )


@pytest.fixture
async def replicas(
    node_settings: Settings, redis: aioredis.Redis, names: Names
) -> AsyncIterator[list[TokenBroker]]:
    box = SecretBox.from_settings(node_settings)
    brokers = [TokenBroker(node_settings, redis, names, box) for _ in range(2)]
    yield brokers
    for broker in brokers:
        await broker.aclose()


async def test_strict_rotation_provider_gets_one_request_per_expiry(
    node_idp: str, node_settings: Settings, replicas: list[TokenBroker]
) -> None:
    ca_file = node_settings.idp_ca_file
    connection = sign_in_connection("node1")
    seeded = _get(f"{node_idp}/_seed?account={SIGN_IN_USER}", ca_file)
    await import_refresh_token(replicas[0], connection, str(seeded["refresh_token"]))
    for round_number in (1, 2, 3):
        await expire_access_token(replicas[0], connection)
        before = _get(f"{node_idp}/_count", ca_file)["token"]
        calls = [b.access_token(connection, 600) for b in replicas for _ in range(50)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [repr(r) for r in results if not isinstance(r, str)]
        assert errors == [], round_number
        digests = {hashlib.sha256(r.encode()).digest() for r in results if isinstance(r, str)}
        assert len(digests) == 1, round_number
        assert _get(f"{node_idp}/_count", ca_file)["token"] == before + 1, round_number  # type: ignore[operator]
    assert not (await replicas[0].status(connection))["needs_sign_in"]
