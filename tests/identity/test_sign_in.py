"""Signing a connection in with the device code flow; the tests play the user over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.failures import REAUTH_REQUIRED, RefreshFailure
from dispatcher.adapters.identity.sign_in import (
    DeviceCodePrompt,
    sign_in_with_device_code,
)
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.errors import SignInFailed
from dispatcher.models import Connection
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.constants import SIGN_IN_USER, TENANT
from tests.support.identity import sign_in_connection

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def approve(idp: IdentityProvider, prompt: DeviceCodePrompt, username: str) -> None:
    """Do what the user does: open the page and enter the code."""
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=idp.ca_file)) as client:
        page = await client.get(prompt.verification_uri)
        assert page.status_code == 200 and "user_code" in page.text
        answer = await client.post(
            prompt.verification_uri, data={"user_code": prompt.user_code, "username": username}
        )
        assert answer.status_code == 200, answer.text


async def sign_in_as(
    broker: TokenBroker, idp: IdentityProvider, connection: Connection, username: str
) -> dict[str, object]:
    prompts: asyncio.Queue[DeviceCodePrompt] = asyncio.Queue()
    task = asyncio.create_task(
        sign_in_with_device_code(broker, connection, prompts.put_nowait, timeout_s=30)
    )
    prompt = await asyncio.wait_for(prompts.get(), 10)
    assert prompt.user_code in prompt.message
    await approve(idp, prompt, username)
    return await asyncio.wait_for(task, 20)


async def test_device_code_sign_in_stores_tokens_and_clears_the_marker(
    broker: TokenBroker, idp: IdentityProvider
) -> None:
    connection = sign_in_connection("s2")
    status = await sign_in_as(broker, idp, connection, SIGN_IN_USER)
    assert status["account"] == SIGN_IN_USER and not status["needs_sign_in"]
    assert idp.counters()["devicecode"] == 1
    token = await broker.access_token(connection, 600)
    assert token and token not in json.dumps(status)
    tokens_before = idp.counters()["token"]
    await broker.access_token(connection, 600)
    assert idp.counters()["token"] == tokens_before  # the sign-in's token is cached

    # Revoked, marked, then signed in again: runs work again.
    idp.revoke_user(SIGN_IN_USER)
    revoked = RefreshFailure(REAUTH_REQUIRED, "invalid_grant", (50173,))
    await broker.store.mark(connection.connection_id, revoked)
    assert (await broker.status(connection))["needs_sign_in"]
    await sign_in_as(broker, idp, connection, SIGN_IN_USER)
    assert not (await broker.status(connection))["needs_sign_in"]
    assert await broker.access_token(connection, 600)


async def test_sign_in_with_another_account_stores_nothing(
    broker: TokenBroker, idp: IdentityProvider
) -> None:
    connection = sign_in_connection("s3")
    with pytest.raises(SignInFailed, match=r"mallory@contoso\.com"):
        await sign_in_as(broker, idp, connection, "mallory@contoso.com")
    assert (await broker.status(connection))["signed_in"] is False


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNDISPATCH_")}
    env.update(
        RUNDISPATCH_REDIS_URL=settings.redis_url.get_secret_value(),
        RUNDISPATCH_NAMESPACE=settings.namespace,
        RUNDISPATCH_SECRET_KEYS=settings.secret_keys.get_secret_value(),
        RUNDISPATCH_AUTHORITY_HOST=settings.authority_host,
        RUNDISPATCH_CLIENT_ID=settings.client_id,
        RUNDISPATCH_CLIENT_SECRET=settings.client_secret.get_secret_value(),
        RUNDISPATCH_IDP_CA_FILE=settings.idp_ca_file,
        PYTHONPATH=str(REPO),
    )
    return env


async def test_cli_sign_in_and_show(
    identity_settings: Settings,
    broker: TokenBroker,
    idp: IdentityProvider,
    redis: aioredis.Redis,
    names: Names,
) -> None:
    connection = sign_in_connection("cli1")
    await redis.hset(names.connections, "cli1", connection.model_dump_json())
    env = _env(identity_settings)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "connections",
        "sign-in",
        "cli1",
        "--timeout",
        "30",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    first_line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert "devicelogin" in first_line, first_line
    (user_code,) = idp.device_codes()
    assert user_code in first_line
    await approve(idp, DeviceCodePrompt(f"{idp.url}/devicelogin", user_code, "", 0), SIGN_IN_USER)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert f"signed in as {SIGN_IN_USER}" in out.decode()

    code, shown, errors = await run_cli(env, "connections", "show", "cli1", "--json")
    assert code == 0, errors
    view = json.loads(shown)
    assert view["signed_in"] and not view["needs_sign_in"] and view["tenant_id"] == TENANT
    token = await broker.access_token(connection, 600)
    assert token not in shown and token not in first_line + out.decode()

    code, text, _ = await run_cli(env, "connections", "show", "cli1")
    assert code == 0 and "access token expires" in text
    code, _, _ = await run_cli(env, "connections", "show", "nope")
    assert code == 2


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run ``python -m dispatcher ARGS``: exit status, standard output, standard error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
