"""Identity and secrets end to end: sign-in connections and vaults through real dispatcher and
worker processes, against the local identity provider and vaults (each its own process).

The workers run the ``command`` executor with a flow program that reports the SHA-256 of the
token or password it was handed (never the value), which the tests compare with what the
identity provider issued or what the vault held.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.models import Run, RunStatus
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import (
    OWNER,
    TENANT,
)
from tests.support.identity import (
    Services,
    expire_cached_access_token,
    flow_command,
    machines_online,
    metric_total,
    running_services,
    sha256,
    sign_in_with_device_code,
    sign_in_with_refresh_token,
)
from tests.support.processes import (
    REPO,
    Processes,
    eventually,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SESSION = [{"user": OWNER, "state": "active"}]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    with running_services(tmp_path) as started:
        yield started


@pytest.fixture
def settings(services: Services) -> Settings:
    # Overrides the shared fixture: the dispatchers use the local identity provider.
    return services.settings()


def machines(count: int) -> list[dict[str, Any]]:
    return [
        {"machine_id": f"m{i}", "name": f"BOT-{i:02d}", "group_id": "bots"}
        for i in range(1, count + 1)
    ]


def sign_in_connection(connection_id: str = "s1") -> dict[str, Any]:
    return {
        "connection_id": connection_id,
        "owner": OWNER,
        "kind": "sign_in",
        "target": {"group_id": "bots"},
        "account": OWNER,
        "tenant_id": TENANT,  # the environment's tenant
    }


def fleet(count: int, *connections: dict[str, Any]) -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "bots", "name": "Sign-in bots"}],
        machines=machines(count),
        connections=list(connections) or [sign_in_connection()],
    )


async def start(
    client: Client, settings: Settings, procs: Processes, count: int, dispatchers: int = 1
) -> None:
    """Dispatchers, and one command-executor worker per machine with the user's active session."""
    for index in range(dispatchers):
        procs.dispatcher(f"dispatcher{index + 1}")
    ids = [f"m{i}" for i in range(1, count + 1)]
    for machine_id in ids:
        procs.worker(
            machine_id, sessions=SESSION, executor="command", extra=flow_command(procs.workdir)
        )
    await eventually(lambda: machines_online(client.rt.redis, settings, ids), timeout=30)


async def run_sign_in(client: Client, count: int = 1, connection_id: str = "s1") -> list[Run]:
    run_ids = await asyncio.gather(
        *(
            client.submit(
                connection_id=connection_id,
                flow_id="report-token",
                requested_by=OWNER,
                mode="attended",  # sign-in runs are attended only
                inputs={"n": n},
            )
            for n in range(count)
        )
    )
    return list(await asyncio.gather(*(client.wait(r, timeout=60) for r in run_ids)))


def token_hashes(runs: list[Run]) -> Counter[str]:
    for run in runs:
        assert run.status is RunStatus.succeeded, (run.status, run.error)
        assert run.outputs is not None and run.outputs["kind"] == "access_token"
        assert run.outputs["who"] == OWNER and run.outputs["length"] > 100
    return Counter(str(run.outputs["sha256"]) for run in runs if run.outputs)


def sign_in_s1(procs: Processes, services: Services) -> None:
    """Sign connection ``s1`` in with a refresh token the identity provider mints for OWNER."""
    refresh_token = services.idp.call("mint_refresh_token", tenant_id=TENANT, username=OWNER)
    sign_in_with_refresh_token(procs.env, "s1", refresh_token)


def show(procs: Processes, connection_id: str = "s1") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "connections", "show", connection_id, "--json"],
        env=procs.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return view


async def test_expired_access_token_is_refreshed_and_the_worker_receives_the_new_one(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
) -> None:
    # Access tokens usable for 12 s: the dispatcher hands out tokens valid >= 300 s more, and
    # the identity provider issues them for 312 s. Expiry is real time passing.
    procs.env["RUNDISPATCH_TOKEN_VALIDITY_S"] = "300"
    services.idp.call("set_lifetimes", access_token_s=312)
    apply_fleet(fleet(1))
    await start(client, settings, procs, 1)
    signed_in = sign_in_with_device_code(procs.env, "s1", services.idp, OWNER)
    assert "signed in as alice@contoso.com" in signed_in.stdout
    first = services.issued()
    assert len(first) == 1  # the sign-in's access token

    # Within the token's window: the cached token is handed over, no identity-provider call.
    services.idp.call("reset_counters")
    [run] = await run_sign_in(client)
    assert token_hashes([run]) == {first[0]["sha256"]: 1}
    assert services.idp.token_requests() == 0

    # The token expires (the dispatcher counts from when the sign-in received it: a margin).
    await asyncio.sleep(max(0.0, first[0]["at"] + 12 + 1.5 - time.time()))
    services.idp.call("reset_counters")
    [run] = await run_sign_in(client)
    issued = services.issued()
    assert services.idp.token_requests() == 1  # exactly one refresh
    assert len(issued) == 2
    assert token_hashes([run]) == {issued[-1]["sha256"]: 1}  # the worker got the new token
    assert issued[-1]["sha256"] != first[0]["sha256"]
    assert [e.event for e in run.timeline if e.event != "waiting"] == [
        "queued",
        "dispatched",
        "started",
        "succeeded",
    ]
    view = show(procs)
    assert view["refreshes"] == 1 and not view["needs_sign_in"]
    assert view["access_token_expires_at"] > time.time() + 290
    rendered = json.dumps(view)
    assert all(t["token"] not in rendered for t in services.idp.call("issued"))


async def test_200_sign_in_runs_through_two_dispatchers_make_one_request_per_expiry(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
) -> None:
    machine_count = 10  # one attended run per user session at a time: ten sessions
    apply_fleet(fleet(machine_count))
    sign_in_s1(procs, services)
    await start(client, settings, procs, machine_count, dispatchers=2)
    services.idp.call("set_latency", seconds=0.3, endpoint="token")  # widen the race window
    seen: set[str] = set()
    for round_number, count in ((1, 200), (2, 100)):
        await expire_cached_access_token(settings, "s1")
        services.idp.call("reset_counters")
        runs = await run_sign_in(client, count)
        hashes = token_hashes(runs)
        latest = services.issued()[-1]["sha256"]
        assert services.idp.token_requests() == 1, round_number  # one request per expiry
        assert hashes == {latest: count}, round_number  # every run got the refreshed token
        assert latest not in seen
        seen.add(latest)
        assert len({run.machine_id for run in runs}) >= machine_count // 2  # spread out
    # Both dispatcher processes handed sign-in runs over.
    per_dispatcher = [
        metric_total(procs.log_text(name), "rundispatch_runs_dispatched_total")
        for name in ("dispatcher1", "dispatcher2")
    ]
    assert sum(per_dispatcher) == 300 and min(per_dispatcher) > 0, per_dispatcher
    refreshes = [
        metric_total(procs.log_text(name), "rundispatch_token_refreshes_total")
        for name in ("dispatcher1", "dispatcher2")
    ]
    assert sum(refreshes) == 2, refreshes  # one per expiry, whichever replica made it
    assert sorted(Counter(e["run_id"] for e in procs.executions()).values()) == [1] * 300


async def test_revoked_grant_fails_the_first_run_and_every_later_one_without_a_request(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
) -> None:
    apply_fleet(fleet(1))
    sign_in_s1(procs, services)
    await start(client, settings, procs, 1, dispatchers=2)
    await expire_cached_access_token(settings, "s1")
    assert services.idp.call("revoke_user", username=OWNER) == 1
    services.idp.call("reset_counters")

    [first] = await run_sign_in(client)
    assert first.status is RunStatus.failed
    assert first.error is not None and first.error.code is ErrorCode.PasswordlessTokenExpiry
    assert "AADSTS50173" in first.error.message
    assert services.idp.token_requests() == 1

    later = await run_sign_in(client, 10)
    assert {(r.status, r.error.code if r.error else None) for r in later} == {
        (RunStatus.failed, ErrorCode.PasswordlessTokenExpiry)
    }
    assert services.idp.token_requests() == 1  # no further identity-provider request
    # ... and fast: each failed head makes way for the next run of its lane at once, rather
    # than waiting for a periodic re-sweep per run (1 s here, 5 s by default).
    spread = max(r.finished_at or 0 for r in later) - min(r.queued_at or 0 for r in later)
    assert spread < 2.0, spread
    assert procs.executions() == []  # no worker ever started one
    view = show(procs)
    assert view["needs_sign_in"] and "sign in again" in view["error"]

    # Signing in again clears the marker; runs get tokens again.
    sign_in_s1(procs, services)
    [again] = await run_sign_in(client)
    assert token_hashes([again]) == {services.issued()[-1]["sha256"]: 1}
    assert not show(procs)["needs_sign_in"]


async def test_503_from_the_identity_provider_is_retried_and_the_run_succeeds(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
) -> None:
    apply_fleet(fleet(1))
    sign_in_s1(procs, services)
    await start(client, settings, procs, 1)
    await expire_cached_access_token(settings, "s1")
    services.idp.call("fail_next", count=1, status=503, endpoint="token", retry_after=1)
    services.idp.call("reset_counters")

    [run] = await run_sign_in(client)
    assert token_hashes([run]) == {services.issued()[-1]["sha256"]: 1}
    assert services.idp.token_requests() == 2  # the 503, then the refresh
    waited = [e for e in run.timeline if e.event == "waiting"]
    assert any("IdentityProviderUnavailable" in json.dumps(e.detail) for e in waited), waited
    assert not show(procs)["needs_sign_in"]


async def test_key_vault_and_cyberark_secrets_are_fetched_at_dispatch_time(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
) -> None:
    services.start_vaults()
    keyvault, cyberark = services.keyvault, services.cyberark
    connections = [
        {
            "connection_id": "kv1",
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": "bots"},
            "username": "CONTOSO\\svc-kv",
            "secret_ref": {
                "provider": "azure_key_vault",
                "vault_url": keyvault.url,
                "secret_name": "svc-kv-password",
            },
        },
        {
            "connection_id": "ca1",
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": "bots"},
            "username": "CONTOSO\\svc-ca",
            "secret_ref": {
                "provider": "cyberark",
                "vault_url": cyberark.url,
                "app_id": "rundispatch",
                "safe": "Finance",
                "object": "svc-ca",
            },
        },
    ]
    apply_fleet(fleet(1, *connections))
    await start(client, settings, procs, 1)

    async def run_both() -> dict[str, dict[str, Any]]:
        ids = {
            c: await client.submit(
                connection_id=c, flow_id="report-password", requested_by=OWNER, mode="unattended"
            )
            for c in ("kv1", "ca1")
        }
        outputs = {}
        for connection_id, run_id in ids.items():
            run = await client.wait(run_id, timeout=30)
            assert run.status is RunStatus.succeeded, (connection_id, run.error)
            assert run.outputs is not None and run.outputs["kind"] == "password"
            outputs[connection_id] = run.outputs
        return outputs

    for version in (1, 2):
        kv_password, ca_password = f"kv-password-v{version}!", f"ca-password-v{version}#"
        keyvault.call("set_secret", name="svc-kv-password", value=kv_password)
        cyberark.call("set_account", safe="Finance", object="svc-ca", content=ca_password)
        outputs = await run_both()
        assert outputs["kv1"]["sha256"] == sha256(kv_password), version
        assert outputs["kv1"]["who"] == "CONTOSO\\svc-kv"
        assert outputs["ca1"]["sha256"] == sha256(ca_password), version
        assert outputs["ca1"]["who"] == "CONTOSO\\svc-ca"
    # One secret read per run (never cached); the vault token was asked once (cached).
    # Every run read its secret (the first Key Vault read also met the 401 challenge); the
    # vault's bearer token was asked for once.
    assert keyvault.call("counters")["secrets"] == 3
    assert cyberark.call("counters")["accounts"] == 2
    assert len(services.issued("access_token", grant="client")) == 1

    # A secret that no longer exists fails the run with a clear code.
    keyvault.call("delete_secret", name="svc-kv-password")
    run_id = await client.submit(
        connection_id="kv1", flow_id="report-password", requested_by=OWNER, mode="unattended"
    )
    run = await client.wait(run_id, timeout=30)
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code is ErrorCode.SecretNotFound
