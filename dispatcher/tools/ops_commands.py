"""The operations commands of ``python -m dispatcher``: ``doctor``, ``definitions``,
``contract`` and ``secrets rotate`` (the parser is in :mod:`dispatcher.tools.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dispatcher.settings import Settings
from dispatcher.tools.commands import print_json


async def cmd_secrets_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from dispatcher.adapters.redis.rotation import reseal_all
    from dispatcher.bootstrap import runtime
    from dispatcher.crypto import SecretBox

    box = SecretBox.from_settings(settings)
    async with runtime(settings, amqp=False) as rt:
        result = await reseal_all(rt.redis, rt.names, box, dry_run=args.dry_run)
    if args.json:
        print_json(asdict(result))
    else:
        verb = "would re-seal" if args.dry_run else "re-sealed"
        print(f"{verb} {len(result.resealed)}, already current {result.current}")
        for label in result.changed_meanwhile:
            print(f"changed meanwhile (written with the current key): {label}")
        for label in result.unreadable:
            print(f"does not open with any configured key: {label}")
    return 1 if result.unreadable else 0


async def cmd_contract(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.contract import write

    for path in write(Path(args.output)):
        print(f"wrote {path}")
    return 0


async def cmd_definitions(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.adapters.amqp.cluster import split_urls
    from dispatcher.adapters.amqp.definitions import definitions_document, write_definitions
    from dispatcher.names import Names

    names = Names(settings.namespace)
    # The queues' arguments as this configuration's processes declare them.
    cluster = len(split_urls(settings.amqp_url.get_secret_value())) > 1
    one_active = settings.active_replicas == "one"
    if args.output:
        write_definitions(
            Path(args.output),
            names,
            args.vhost,
            settings.dead_letter_max,
            cluster=cluster,
            one_active=one_active,
        )
        print(f"wrote {args.output}")
    else:
        document = definitions_document(
            names,
            args.vhost,
            dead_letter_max=settings.dead_letter_max,
            cluster=cluster,
            one_active=one_active,
        )
        print(json.dumps(document, indent=2))
    return 0


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.doctor import as_json, diagnose, render

    checks = await diagnose(settings)
    print_json(as_json(checks)) if args.json else print(render(checks))
    return 1 if any(check.status == "FAIL" for check in checks) else 0


async def cmd_queues_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Declare the queues that hold runs again with this configuration's arguments, keeping
    their messages (adapters/amqp/migrate.py)."""
    import sys

    from dispatcher.adapters.amqp.cluster import connect_any, split_urls
    from dispatcher.adapters.amqp.identities import vhost_of
    from dispatcher.adapters.amqp.migrate import (
        Migration,
        impersonator,
        migrate_queue,
        queue_state,
    )
    from dispatcher.adapters.amqp.topology import run_queue_bindings, shared_queue_arguments
    from dispatcher.names import Names
    from dispatcher.tools.principals import principal_url

    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    urls = split_urls(url)
    expected = shared_queue_arguments(
        names,
        cluster=len(urls) > 1,
        dead_letter_max=settings.dead_letter_max,
        one_active=settings.active_replicas == "one",
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results: list[Migration] = []
    connection = await connect_any(urls)
    async with connection:
        if args.dry_run:
            for queue in run_queue_bindings(names):
                results.append(
                    Migration(queue, await queue_state(connection, queue, expected[queue]))
                )
        else:
            admin = settings.broker_admin_url.get_secret_value()
            as_user = lambda user, password: principal_url(settings, user, password)  # noqa: E731
            async with impersonator(admin, vhost_of(url), names, as_user) as mover:
                for queue in run_queue_bindings(names):
                    migration = await migrate_queue(
                        connection, mover, names, queue, expected[queue], progress=progress
                    )
                    results.append(migration)
    if args.json:
        print_json([{"queue": m.queue, "state": m.state.name, "moved": m.moved} for m in results])
    else:
        for m in results:
            print(f"{m.queue}: {m.state}" + (f" ({m.moved} messages moved)" if m.moved else ""))
        if not args.dry_run:
            print("the heartbeats and signals queues (hints) are re-created by the dispatchers")
    return 0
