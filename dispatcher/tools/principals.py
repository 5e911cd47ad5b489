"""Registration: ``machines register|unregister``, ``submitters register|unregister``,
``operators register|unregister`` and ``broker definitions``.

Registering a machine creates (or re-creates, rotating its password) the machine's own broker
identity with the narrowest permissions (``core/principals.py``), declares its queue, and drops
the worker key pinned for it: the next worker key that heartbeats is pinned. Registering a
submitter creates its identity and records the owners it may act for. Registering an operator
creates an identity that watches (every run's events, the dead letters) and cancels runs, and
can do nothing else on the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from dispatcher.core.principals import (
    Principal,
    definitions,
    machine_principal,
    operator_principal,
    submitter_principal,
)
from dispatcher.crypto import rabbit_password_hash
from dispatcher.errors import ConfigurationError, NotFound
from dispatcher.names import Names
from dispatcher.settings import Settings

MACHINE_ID = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")


def principal_url(settings: Settings, username: str, password: str) -> str:
    """The AMQP URL of a principal: the dispatcher's broker address (each node of a cluster's
    list) with its own credentials."""
    return ",".join(
        _with_credentials(url, username, password)
        for url in settings.amqp_url.get_secret_value().split(",")
        if url.strip()
    )


def _with_credentials(url: str, username: str, password: str) -> str:
    parts = urlsplit(url.strip())
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _identities(settings: Settings) -> Any:
    from dispatcher.adapters.amqp.identities import BrokerIdentities, vhost_of

    return BrokerIdentities(
        settings.broker_admin_url.get_secret_value(), vhost_of(settings.amqp_url.get_secret_value())
    )


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)


async def cmd_machines_register(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.bootstrap import runtime

    machine_id = args.machine_id
    if not MACHINE_ID.match(machine_id):
        raise ConfigurationError(f"machine id {machine_id!r} must match {MACHINE_ID.pattern}")
    principal = machine_principal(Names(settings.namespace), machine_id)
    password = new_password()
    async with runtime(settings) as rt:
        fleet = await rt.fleet.load(force=True)
        async with _identities(settings) as identities:
            await identities.put(principal, password)
        await rt.amqp.ensure_machine_queue(machine_id)
        await rt.machines.forget_key(machine_id)
    url = principal_url(settings, principal.username, password)
    known = "" if machine_id in fleet.machines else " (not in the fleet yet: apply it)"
    _print(
        args,
        {"machine_id": machine_id, "username": principal.username, "amqp_url": url},
        f"machine {machine_id} registered{known}; start its worker with\n"
        f"  RUNDISPATCH_AMQP_URL='{url}'\n"
        "the first worker key that heartbeats is pinned; another key is refused until the "
        "machine is registered again",
    )
    return 0


async def cmd_machines_unregister(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.bootstrap import runtime

    names = Names(settings.namespace)
    async with runtime(settings, amqp=False) as rt:
        async with _identities(settings) as identities:
            existed = await identities.delete(names.machine_user(args.machine_id))
        await rt.machines.forget_key(args.machine_id)
    if not existed:
        raise NotFound(f"machine {args.machine_id} has no broker identity")
    print(f"machine {args.machine_id} unregistered: its identity and pinned key are removed")
    return 0


def _operators(text: str | None) -> list[str]:
    return sorted({o.strip() for o in (text or "").split(",") if o.strip()})


def _owners(text: str) -> list[str]:
    owners = sorted({o.strip() for o in text.split(",") if o.strip()})
    if not owners:
        raise ConfigurationError("--acts-for needs at least one owner")
    return owners


async def cmd_submitters_register(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.bootstrap import runtime

    names = Names(settings.namespace)
    principal = submitter_principal(names, args.name)
    owners = _owners(args.acts_for)
    password = new_password()
    async with runtime(settings, amqp=False) as rt:
        async with _identities(settings) as identities:
            await identities.put(principal, password)
        await rt.fleet.put_submitter(args.name, owners)
    url = principal_url(settings, principal.username, password)
    _print(
        args,
        {
            "submitter": args.name,
            "username": principal.username,
            "acts_for": owners,
            "amqp_url": url,
            "queue_prefix": names.submitter_queue_prefix(args.name),
        },
        f"submitter {args.name} registered, acting for {', '.join(owners)}; it connects with\n"
        f"  {url}",
    )
    return 0


async def cmd_submitters_unregister(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.bootstrap import runtime

    names = Names(settings.namespace)
    async with runtime(settings, amqp=False) as rt:
        async with _identities(settings) as identities:
            existed = await identities.delete(names.submitter_user(args.name))
        await rt.fleet.remove_submitter(args.name)
    if not existed:
        raise NotFound(f"submitter {args.name} has no broker identity")
    print(f"submitter {args.name} unregistered")
    return 0


async def cmd_operators_register(args: argparse.Namespace, settings: Settings) -> int:
    names = Names(settings.namespace)
    principal = operator_principal(names, args.name)
    password = new_password()
    async with _identities(settings) as identities:
        await identities.put(principal, password)
    url = principal_url(settings, principal.username, password)
    _print(
        args,
        {
            "operator": args.name,
            "username": principal.username,
            "amqp_url": url,
            "queue_prefix": names.operator_queue_prefix(args.name),
            "events_exchange": names.events_exchange,
            "dead_queue": names.dead_queue,
        },
        f"operator {args.name} registered: it may read every run's events (bind "
        f"{names.events_exchange} to queues named {names.operator_queue_prefix(args.name)}*), "
        f"read {names.dead_queue} and cancel runs; it connects with\n  {url}",
    )
    return 0


async def cmd_operators_unregister(args: argparse.Namespace, settings: Settings) -> int:
    names = Names(settings.namespace)
    async with _identities(settings) as identities:
        existed = await identities.delete(names.operator_user(args.name))
    if not existed:
        raise NotFound(f"operator {args.name} has no broker identity")
    print(f"operator {args.name} unregistered")
    return 0


async def cmd_broker_definitions(args: argparse.Namespace, settings: Settings) -> int:
    """Definitions for the fleet's machines and the registered submitters, with new passwords
    (hashed in the file; the URLs go to ``--credentials-out``, readable by its owner only)."""
    from dispatcher.adapters.amqp.cluster import split_urls
    from dispatcher.adapters.amqp.identities import vhost_of
    from dispatcher.bootstrap import runtime

    names = Names(settings.namespace)
    async with runtime(settings, amqp=False) as rt:
        fleet = await rt.fleet.load(force=True)
    principals: list[Principal] = [machine_principal(names, m) for m in sorted(fleet.machines)]
    principals += [submitter_principal(names, s) for s in sorted(fleet.submitters)]
    principals += [operator_principal(names, o) for o in _operators(args.operators)]
    passwords = {p.username: new_password() for p in principals}
    document = definitions(
        names,
        vhost_of(settings.amqp_url.get_secret_value()),
        principals,
        {user: rabbit_password_hash(password) for user, password in passwords.items()},
        cluster=len(split_urls(settings.amqp_url.get_secret_value())) > 1,
        machine_queue_type=settings.machine_queue_type,
    )
    credentials = {
        p.username: principal_url(settings, p.username, passwords[p.username]) for p in principals
    }
    out = Path(args.credentials_out)
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(credentials, handle, indent=2)
    os.chmod(out, 0o600)
    json.dump(document, sys.stdout, indent=2)
    print()
    return 0


def register(machines: Any, sub: Any, add: Any) -> None:
    """Add the registration commands to the CLI parser (``add`` as in ``cli.build_parser``)."""
    p = add("register", cmd_machines_register, "create or rotate a machine's identity", machines)
    p.add_argument("machine_id")
    p.add_argument("--json", action="store_true")
    p = add("unregister", cmd_machines_unregister, "remove a machine's identity and key", machines)
    p.add_argument("machine_id")

    submitters = add(
        "submitters", cmd_submitters_register, "submitters (cloud-flow environments)", sub
    ).add_subparsers(dest="submitters_command", required=True)
    p = add("register", cmd_submitters_register, "create or rotate a submitter", submitters)
    p.add_argument("name")
    p.add_argument("--acts-for", required=True, metavar="OWNER[,OWNER]")
    p.add_argument("--json", action="store_true")
    p = add("unregister", cmd_submitters_unregister, "remove a submitter", submitters)
    p.add_argument("name")

    operators = add(
        "operators", cmd_operators_register, "operators (people and tools that watch)", sub
    ).add_subparsers(dest="operators_command", required=True)
    p = add(
        "register",
        cmd_operators_register,
        "create or rotate an operator's identity: read every run's events and the dead "
        "letters, cancel runs; nothing else on the broker",
        operators,
    )
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = add("unregister", cmd_operators_unregister, "remove an operator's identity", operators)
    p.add_argument("name")

    broker = add("broker", cmd_broker_definitions, "broker provisioning", sub).add_subparsers(
        dest="broker_command", required=True
    )
    p = add(
        "definitions",
        cmd_broker_definitions,
        "print RabbitMQ definitions (users, permissions, machine queues) for operators",
        broker,
    )
    p.add_argument(
        "--credentials-out",
        required=True,
        metavar="FILE",
        help="where the new identities' AMQP URLs go (mode 0600)",
    )
    p.add_argument(
        "--operators",
        metavar="NAME[,NAME]",
        help="also an identity for each of these operators (operators are not in the fleet)",
    )
