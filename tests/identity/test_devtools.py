"""The local services as a demo uses them: started as processes, driven by the admin API."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.server import AdminClient, AdminError
from tests.support.constants import TENANT

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def start(module: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


@pytest.fixture
def idp_process(cert_dir: Path) -> Iterator[dict[str, str]]:
    process, info = start("devtools.idp", "--cert-dir", str(cert_dir))
    yield info
    process.terminate()
    assert process.wait(timeout=10) == 0
    if process.stdout:
        process.stdout.close()


def test_identity_provider_process_is_driven_by_its_admin_api(
    idp_process: dict[str, str],
) -> None:
    url, ca_file = idp_process["url"], idp_process["ca_file"]
    admin = AdminClient(url, ca_file)
    refresh_token = admin.call("mint_refresh_token", tenant_id=TENANT, username="bob@contoso.com")
    admin.call("fail_next", count=1, status=503, endpoint="token")
    with httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) as http:
        discovery = http.get(f"{url}/{TENANT}/v2.0/.well-known/openid-configuration").json()
        form = {
            "grant_type": "refresh_token",
            "client_id": "rundispatch-local",
            "client_secret": "local-secret",
            "refresh_token": refresh_token,
            "scope": "flows.execute offline_access",
        }
        assert http.post(discovery["token_endpoint"], data=form).status_code == 503
        answer = http.post(discovery["token_endpoint"], data=form).json()
        assert answer["scope"] == "flows.execute" and answer["refresh_token"] != refresh_token
        assert answer["expires_in"] == 3600 and "client_info" in answer
        assert admin.call("revoke_user", username="bob@contoso.com") == 1
        form["refresh_token"] = answer["refresh_token"]
        revoked = http.post(discovery["token_endpoint"], data=form).json()
        assert revoked["error"] == "invalid_grant" and revoked["error_codes"] == [50173]
    assert admin.call("counters") == {"discovery": 1, "token": 3}
    with pytest.raises(AdminError, match="300"):
        admin.call("set_lifetimes", access_token_s=120)


def test_vault_processes_serve_their_api_shapes(cert_dir: Path) -> None:
    kv, kv_info = start(
        "devtools.vaults",
        "--kind",
        "keyvault",
        "--cert-dir",
        str(cert_dir),
        "--authority",
        f"https://127.0.0.1:1/{TENANT}",
    )
    ccp, ccp_info = start("devtools.vaults", "--kind", "cyberark", "--cert-dir", str(cert_dir))
    try:
        AdminClient(kv_info["url"], kv_info["ca_file"]).call("set_secret", name="a", value="v")
        AdminClient(ccp_info["url"], ccp_info["ca_file"]).call(
            "set_account", safe="S", object="O", content="pw"
        )
        context = ssl.create_default_context(cafile=kv_info["ca_file"])
        with httpx.Client(verify=context) as http:
            challenge = http.get(f"{kv_info['url']}/secrets/a", params={"api-version": "7.4"})
            assert challenge.status_code == 401
            assert (
                f'authorization="https://127.0.0.1:1/{TENANT}"'
                in (challenge.headers["WWW-Authenticate"])
            )
            account = http.get(
                f"{ccp_info['url']}/AIMWebService/api/Accounts",
                params={"AppID": "App", "Safe": "S", "Object": "O"},
            ).json()
            assert account["Content"] == "pw" and account["UserName"] == "svc-user"
    finally:
        for process in (kv, ccp):
            process.terminate()
            process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()
