"""``python -m dispatcher connections sign-in ID`` and ``connections show ID [--json]``.

``register(subparsers)`` adds the commands to the main CLI; each sets ``func`` to a synchronous
``(args, settings) -> int`` that runs its own event loop. Nothing here prints a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from dispatcher.adapters.identity.sign_in import (
    DeviceCodePrompt,
    import_refresh_token,
    sign_in_with_device_code,
)
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.adapters.identity.token_store import TokenStore, token_status
from dispatcher.bootstrap import Runtime, runtime
from dispatcher.crypto import SecretBox
from dispatcher.errors import DispatchError, SignInFailed
from dispatcher.models import Connection, ConnectionKind
from dispatcher.settings import Settings


def register(subparsers: Any) -> None:
    """Add the ``connections`` command group to the main CLI's ``subparsers``."""
    parser = subparsers.add_parser(
        "connections", help="sign connections in and show their token state"
    )
    commands = parser.add_subparsers(dest="connections_command", required=True)
    sign_in = commands.add_parser(
        "sign-in", help="sign a sign-in connection in (device code flow, from a terminal)"
    )
    sign_in.add_argument("connection_id")
    sign_in.add_argument("--timeout", type=float, default=900.0, help="seconds to wait")
    sign_in.add_argument(
        "--refresh-token-stdin",
        action="store_true",
        help="import a refresh token read from standard input instead (migrations, demos)",
    )
    sign_in.set_defaults(func=cmd_sign_in)
    show = commands.add_parser("show", help="a connection's token state or password source")
    show.add_argument("connection_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)


def cmd_sign_in(args: argparse.Namespace, settings: Settings) -> int:
    """Sign the connection in; the user completes the sign-in in a browser."""
    refresh_token = sys.stdin.readline().strip() if args.refresh_token_stdin else None
    return asyncio.run(_sign_in(args.connection_id, args.timeout, settings, refresh_token))


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show the connection's token state (sign-in) or password source (credentials)."""
    return asyncio.run(_show(args.connection_id, args.json, settings))


async def _sign_in(
    connection_id: str, timeout_s: float, settings: Settings, refresh_token: str | None
) -> int:
    def show(prompt: DeviceCodePrompt) -> None:
        print(prompt.message or f"Open {prompt.verification_uri} and enter {prompt.user_code}")
        print(f"Waiting up to {int(prompt.expires_at - time.time())} s ...", flush=True)

    try:
        box = SecretBox.from_settings(settings)
        async with runtime(settings, amqp=False) as rt:
            connection = await _load(rt, connection_id)
            if connection is None or connection.kind is not ConnectionKind.sign_in:
                print(f"{connection_id}: no sign-in connection has this id", file=sys.stderr)
                return 2
            broker = TokenBroker(settings, rt.redis, rt.names, box)
            try:
                if refresh_token:
                    status = await import_refresh_token(broker, connection, refresh_token)
                else:
                    status = await sign_in_with_device_code(
                        broker, connection, show, timeout_s=timeout_s
                    )
            finally:
                await broker.aclose()
    except (SignInFailed, DispatchError) as exc:
        print(f"{connection_id}: sign-in failed: {exc}", file=sys.stderr)
        return 1
    print(f"{connection_id}: signed in as {status['account']}")
    print(f"  access token valid until  {_when(status['access_token_expires_at'])}")
    print(f"  refresh token valid until {_when(status['refresh_token_expires_at'])}")
    return 0


async def _show(connection_id: str, as_json: bool, settings: Settings) -> int:
    async with runtime(settings, amqp=False) as rt:
        connection = await _load(rt, connection_id)
        if connection is None:
            print(f"{connection_id}: no connection has this id", file=sys.stderr)
            return 2
        if connection.kind is ConnectionKind.sign_in:
            store = TokenStore(rt.redis, rt.names, SecretBox.from_settings(settings))
            view = {"kind": "sign_in"} | token_status(connection, await store.load(connection))
        else:
            view = _credentials_view(connection)
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        _print_view(view)
    return 0


async def _load(rt: Runtime, connection_id: str) -> Connection | None:
    return (await rt.fleet.load(force=True)).connections.get(connection_id)


def _credentials_view(connection: Connection) -> dict[str, Any]:
    ref = connection.secret_ref
    source: dict[str, Any] = {"provider": "stored"} if ref is None else ref.model_dump()
    return {
        "kind": "credentials",
        "connection_id": connection.connection_id,
        "username": connection.username,
        "password_source": source,
    }


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    delta = epoch - time.time()
    relative = f"in {delta / 60:.0f} min" if delta >= 0 else f"{-delta / 60:.0f} min ago"
    return f"{stamp} ({relative})"


def _print_view(view: dict[str, Any]) -> None:
    if view["kind"] == "credentials":
        source = view["password_source"]
        where = ", ".join(f"{k}={v}" for k, v in source.items() if v is not None)
        print(f"{view['connection_id']}  credentials  {view['username']}  password: {where}")
        return
    state = "needs sign-in" if view["needs_sign_in"] else "ok"
    if view["error"]:
        state += f": {view['error']} ({_when(view['error_at'])})"
    print(f"{view['connection_id']}  sign_in  {view['account']}  tenant {view['tenant_id']}")
    rows = [
        ("state", state),
        ("signed in", _when(view["signed_in_at"]) if view["signed_in"] else "no"),
        ("access token expires", _when(view["access_token_expires_at"])),
        ("refresh token expires", _when(view["refresh_token_expires_at"])),
        ("last refresh", _when(view["last_refresh_at"])),
        ("refreshes", str(view["refreshes"])),
    ]
    for label, value in rows:
        print(f"  {label:<22} {value}")
