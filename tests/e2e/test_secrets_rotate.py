"""``python -m dispatcher secrets rotate``: after a new key is put first in
RUNDISPATCH_SECRET_KEYS, every stored password and token cache is sealed again with it, so
that the old key can be removed; against the real Redis."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from dispatcher.adapters.identity.token_store import cache_context
from dispatcher.client import Client
from dispatcher.crypto import SecretBox
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.e2e.test_run_path import group_fleet
from tests.support.e2e import cli
from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def test_rotate_reseals_passwords_and_token_caches_with_the_new_key(
    client: Client, settings: Settings, procs: Processes, apply_fleet: Any
) -> None:
    apply_fleet(group_fleet(1))  # connection c1 with a password, sealed with the test's key
    names = Names(settings.namespace)
    old = SecretBox.from_settings(settings)
    redis = client.rt.redis
    cache = json.dumps({"RefreshToken": {"x": {"secret": "refresh-token-1"}}})
    await redis.set(names.token_cache("s1"), old.seal_text(cache, cache_context("s1")))
    before = await redis.hget(names.connections, "c1")
    assert json.loads(before)["password_sealed"].startswith(f"sb1.{old.primary_kid}.")

    rotated_keys = f"k2:{new_key()},{settings.secret_keys.get_secret_value()}"
    procs.env["RUNDISPATCH_SECRET_KEYS"] = rotated_keys
    dry = json.loads(cli(procs, "secrets", "rotate", "--dry-run", "--json").stdout)
    assert sorted(dry["resealed"]) == [
        "connection c1 password",
        "connection s1 token cache",
    ]
    assert await redis.hget(names.connections, "c1") == before  # a dry run changes nothing

    done = json.loads(cli(procs, "secrets", "rotate", "--json").stdout)
    assert sorted(done["resealed"]) == sorted(dry["resealed"]) and done["unreadable"] == []
    only_new = SecretBox.parse(rotated_keys.split(",", maxsplit=1)[0])  # the old key can go now
    connection = json.loads(await redis.hget(names.connections, "c1"))
    assert only_new.open_text(connection["password_sealed"], "c1") == "s3cret-pw"
    token = (await redis.get(names.token_cache("s1"))).decode()
    assert token.startswith("sb1.k2.") and only_new.open_text(token, cache_context("s1")) == cache
    again = json.loads(cli(procs, "secrets", "rotate", "--json").stdout)
    assert again["resealed"] == [] and again["current"] == 2


async def test_a_secret_no_configured_key_opens_is_reported(
    client: Client, settings: Settings, procs: Processes
) -> None:
    names = Names(settings.namespace)
    lost = SecretBox.parse(f"k0:{new_key()}")
    await client.rt.redis.set(names.token_cache("s9"), lost.seal_text("{}", cache_context("s9")))
    result = cli(procs, "secrets", "rotate", check=False)
    assert result.returncode == 1
    assert "does not open with any configured key: connection s9 token cache" in result.stdout
    assert "Traceback" not in result.stderr
