"""A demo-like flow with known secrets, then a search for them everywhere they must not be.

Connections: a stored password, an Azure Key Vault secret, a CyberArk secret and a sign-in
connection whose access token is refreshed (once after an expiry, once through a 503) and whose
grant is finally revoked. Every secret is a known string: the passwords, the client secret, the
secret-at-rest key, the workers' private keys, and every refresh, access and id token the
identity provider issued (it records them). None may appear, plain or encoded, in any log line
of the dispatcher, worker, identity provider, vault or CLI processes, in any Redis value of the
namespace, or in any AMQP message a bystander queue bound to every exchange received.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dispatcher.client import Client
from dispatcher.codes import ErrorCode
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import (
    CLIENT_SECRET,
    OWNER,
    TENANT,
)
from tests.support.identity import (
    Services,
    expire_cached_access_token,
    find_secrets,
    flow_command,
    machines_online,
    running_services,
    sha256,
    sign_in_with_refresh_token,
)
from tests.support.processes import (
    Processes,
    eventually,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STORED_PASSWORD = "Stored-P@ss w0rd/+=%&KNOWN-1"
KEY_VAULT_PASSWORDS = ("KeyVault-S3cret/+= ?KNOWN-2a", "KeyVault-S3cret/+= ?KNOWN-2b")
CYBERARK_PASSWORDS = ("CyberArk-S3cret&=#KNOWN-3a", "CyberArk-S3cret&=#KNOWN-3b")
MACHINES = ("m1", "m2")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    with running_services(tmp_path) as started:
        yield started.start_vaults()


@pytest.fixture
def settings(services: Services) -> Settings:
    return services.settings(log_level="DEBUG")  # every log line there is


def demo_fleet(services: Services) -> dict[str, Any]:
    def credentials(connection_id: str, user: str, **source: Any) -> dict[str, Any]:
        return {
            "connection_id": connection_id,
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": "bots"},
            "username": user,
            **source,
        }

    return fleet_document(
        groups=[{"group_id": "bots", "name": "Demo bots"}],
        machines=[
            {"machine_id": m, "name": m.upper(), "group_id": "bots", "max_unattended_runs": 2}
            for m in MACHINES
        ],
        connections=[
            credentials("pw1", "CONTOSO\\svc-stored", password=STORED_PASSWORD),
            credentials(
                "kv1",
                "CONTOSO\\svc-kv",
                secret_ref={
                    "provider": "azure_key_vault",
                    "vault_url": services.keyvault.url,
                    "secret_name": "svc-kv",
                },
            ),
            credentials(
                "ca1",
                "CONTOSO\\svc-ca",
                secret_ref={
                    "provider": "cyberark",
                    "vault_url": services.cyberark.url,
                    "app_id": "rundispatch",
                    "safe": "Finance",
                    "object": "svc-ca",
                },
            ),
            {
                "connection_id": "s1",
                "owner": OWNER,
                "kind": "sign_in",
                "target": {"group_id": "bots"},
                "account": OWNER,
                "tenant_id": TENANT,
            },
        ],
    )


class Bystander:
    """An exclusive queue bound to every exchange of the namespace, with every routing key."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None

    async def start(self) -> None:
        names = self.names
        self.connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        channel = await self.connection.channel()
        self.queue = await channel.declare_queue(
            f"{names.ns}.bystander", exclusive=True, auto_delete=True
        )
        bindings: list[tuple[str, str]] = [
            (names.events_exchange, "#"),
            (names.requests_exchange, "submit"),
            (names.requests_exchange, "cancel"),
            (names.heartbeats_exchange, ""),
            (names.dead_exchange, ""),
            *((names.machines_exchange, m) for m in MACHINES),
        ]
        for exchange, key in bindings:
            await self.queue.bind(await channel.get_exchange(exchange), key)

    async def drain(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        assert self.queue is not None
        received = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            received.append(message)
        return received

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


async def redis_values(client: Client, settings: Settings) -> dict[str, bytes]:
    """Every key of the namespace with everything it holds, whatever its type."""
    redis: Any = client.rt.redis
    found: dict[str, bytes] = {}
    async for raw_key in redis.scan_iter(match=Names(settings.namespace).pattern(), count=500):
        key = raw_key.decode()
        kind = (await redis.type(raw_key)).decode()
        parts: list[Any]
        if kind == "string":
            parts = [await redis.get(raw_key)]
        elif kind == "hash":
            parts = [item for pair in (await redis.hgetall(raw_key)).items() for item in pair]
        elif kind == "list":
            parts = await redis.lrange(raw_key, 0, -1)
        elif kind == "set":
            parts = list(await redis.smembers(raw_key))
        elif kind == "zset":
            parts = [member for member, _ in await redis.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [
                item
                for _, fields in await redis.xrange(raw_key)
                for pair in fields.items()
                for item in pair
            ]
        else:
            raise AssertionError(f"{key}: unexpected type {kind}")
        found[key] = raw_key + b"\n" + b"\n".join(p if isinstance(p, bytes) else b"" for p in parts)
    return found


def worker_private_keys(procs: Processes) -> dict[str, str]:
    keys = {}
    for machine_id in MACHINES:
        pem = (procs.state_dir(machine_id) / "worker.key").read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(private, X25519PrivateKey)
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        keys[f"worker key {machine_id}"] = base64.b64encode(raw).decode()
    return keys


async def test_no_secret_in_logs_redis_or_amqp(
    client: Client,
    settings: Settings,
    services: Services,
    procs: Processes,
    apply_fleet: Any,
    tmp_path: Path,
) -> None:
    idp, keyvault, cyberark = services.idp, services.keyvault, services.cyberark
    keyvault.call("set_secret", name="svc-kv", value=KEY_VAULT_PASSWORDS[0])
    cyberark.call("set_account", safe="Finance", object="svc-ca", content=CYBERARK_PASSWORDS[0])
    apply_fleet(demo_fleet(services))
    procs.dispatcher("dispatcher1")
    procs.dispatcher("dispatcher2")
    for machine_id in MACHINES:
        procs.worker(
            machine_id,
            sessions=[{"user": OWNER, "state": "active"}],
            executor="command",
            extra=flow_command(tmp_path),
        )
    await eventually(lambda: machines_online(client.rt.redis, settings, list(MACHINES)), 30)
    bystander = Bystander(settings)
    await bystander.start()
    try:
        cli_output = await demo_flow(client, settings, services, procs)
        messages = await bystander.drain()
    finally:
        await bystander.close()

    # The known secrets: everything issued, stored, configured or generated.
    secrets: dict[str, str] = {
        "stored password": STORED_PASSWORD,
        "client secret": CLIENT_SECRET,
        "secret-at-rest key": settings.secret_keys.get_secret_value().split(":", 1)[1],
        **{f"key vault v{i}": v for i, v in enumerate(KEY_VAULT_PASSWORDS)},
        **{f"cyberark v{i}": v for i, v in enumerate(CYBERARK_PASSWORDS)},
        **worker_private_keys(procs),
    }
    issued = idp.call("issued")
    for n, token in enumerate(issued):
        secrets[f"{token['grant']} {token['kind']} #{n}"] = token["token"]
    kinds = {(t["grant"], t["kind"]) for t in issued}
    assert kinds == {
        ("minted", "refresh_token"),
        ("user", "access_token"),
        ("user", "refresh_token"),
        ("user", "id_token"),
        ("client", "access_token"),  # the Key Vault's bearer token
    }
    assert sum(t["kind"] == "access_token" and t["grant"] == "user" for t in issued) == 4

    # Logs of every process, and what the CLI printed.
    logs = sorted(procs.workdir.glob("*.log"))
    assert {p.stem for p in logs} >= {"dispatcher1", "dispatcher2", "idp", "keyvault", "cyberark"}
    assert {p.stem for p in logs} >= {f"worker-{m}" for m in MACHINES}
    assert "refreshed the sign-in of connection s1" in (
        procs.log_text("dispatcher1") + procs.log_text("dispatcher2")
    )
    leaks = {path.name: hits for path in logs if (hits := find_secrets(path.read_bytes(), secrets))}
    leaks |= {"CLI output": hits} if (hits := find_secrets(cli_output.encode(), secrets)) else {}
    assert leaks == {}, leaks

    # Every Redis value of the namespace.
    values = await redis_values(client, settings)
    assert any(key.endswith(":tokens:s1") for key in values)  # the sealed token cache is there
    assert any(sha256(STORED_PASSWORD).encode() in blob for blob in values.values())  # outputs
    leaks = {key: hits for key, blob in values.items() if (hits := find_secrets(blob, secrets))}
    assert leaks == {}, leaks

    # Every AMQP message of every exchange.
    exchanges = {m.exchange for m in messages}
    names = Names(settings.namespace)
    assert exchanges >= {
        names.events_exchange,
        names.requests_exchange,
        names.machines_exchange,
        names.heartbeats_exchange,
    }, exchanges
    sealed = [m for m in messages if m.exchange == names.machines_exchange]  # 10 hand-offs
    assert len(sealed) >= 10 and all(b"sealed_secret" in m.body for m in sealed)
    leaks = {}
    for n, message in enumerate(messages):
        blob = message.body + repr(message.headers).encode() + repr(message.info()).encode()
        if hits := find_secrets(blob, secrets):
            leaks[f"#{n} {message.exchange} {message.routing_key}"] = hits
    assert leaks == {}, leaks


async def demo_flow(
    client: Client, settings: Settings, services: Services, procs: Processes
) -> str:
    """Runs over every connection; returns what the connections CLI printed."""
    idp, keyvault, cyberark = services.idp, services.keyvault, services.cyberark
    refresh_token = idp.call("mint_refresh_token", tenant_id=TENANT, username=OWNER)
    signed_in = sign_in_with_refresh_token(procs.env, "s1", refresh_token)
    cli_output = signed_in.stdout + signed_in.stderr

    async def run(connection_id: str, mode: str = "unattended") -> dict[str, Any]:
        run_id = await client.submit(
            connection_id=connection_id, flow_id="demo", requested_by=OWNER, mode=mode
        )
        record = await client.wait(run_id, timeout=30)
        assert record.status is RunStatus.succeeded, (connection_id, record.error)
        assert record.outputs is not None
        assert record.outputs["secret_in_environment"] is False
        return record.outputs

    async def sign_in_run() -> str:
        outputs = await run("s1", "attended")
        assert outputs["kind"] == "access_token"
        return str(outputs["sha256"])

    for version in (0, 1):
        keyvault.call("set_secret", name="svc-kv", value=KEY_VAULT_PASSWORDS[version])
        cyberark.call(
            "set_account", safe="Finance", object="svc-ca", content=CYBERARK_PASSWORDS[version]
        )
        outputs = await asyncio.gather(run("pw1"), run("kv1"), run("ca1"))
        assert [o["sha256"] for o in outputs] == [
            sha256(STORED_PASSWORD),
            sha256(KEY_VAULT_PASSWORDS[version]),
            sha256(CYBERARK_PASSWORDS[version]),
        ]

    def latest_access_token() -> str:
        tokens = [t for t in idp.call("issued") if t["kind"] == "access_token"]
        return str([t for t in tokens if t["grant"] == "user"][-1]["sha256"])

    assert await sign_in_run() == latest_access_token()  # the sign-in's own token
    await expire_cached_access_token(settings, "s1")
    assert await sign_in_run() == latest_access_token()  # refreshed
    await expire_cached_access_token(settings, "s1")
    idp.call("fail_next", count=1, status=503, endpoint="token", retry_after=1)
    assert await sign_in_run() == latest_access_token()  # refreshed after a 503
    # A new sign-in (device code's equivalent), then a revoked grant: error paths log too.
    again = sign_in_with_refresh_token(
        procs.env, "s1", idp.call("mint_refresh_token", tenant_id=TENANT, username=OWNER)
    )
    cli_output += again.stdout + again.stderr
    assert await sign_in_run() == latest_access_token()
    await expire_cached_access_token(settings, "s1")
    idp.call("revoke_user", username=OWNER)
    run_id = await client.submit(
        connection_id="s1", flow_id="demo", requested_by=OWNER, mode="attended"
    )
    failed = await client.wait(run_id, timeout=30)
    assert failed.error is not None and failed.error.code is ErrorCode.PasswordlessTokenExpiry
    return cli_output
