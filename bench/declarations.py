"""How fast the dispatcher declares machines' queues: ``count`` machines (each a machine queue
and a replies queue, bound to the machines exchange) declared through the product's broker
adapter (``Amqp.ensure_machine_queue``), ``at_once`` machines at a time as a replica does in
the background after the machines' first heartbeats. Everything is declared in a private
namespace and deleted afterwards (the queues through the management API).

``python -m bench.declarations --count 2000 --at-once 8`` prints one JSON line:
``{"machines": ..., "at_once": ..., "seconds": ..., "machines_per_s": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.env import cleanup, new_settings
from bench.queuemem import delete_many
from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.names import Names


async def declare(count: int, at_once: int, queue_type: str) -> dict[str, Any]:
    settings = new_settings(machine_queue_type=queue_type)
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    broker = Amqp(url, names, machine_queue_type=queue_type)
    machines = [f"decl-{i:05d}" for i in range(count)]
    queues = [q for m in machines for q in (names.machine_queue(m), names.machine_replies_queue(m))]
    waiting = list(reversed(machines))

    async def declarer() -> None:
        while waiting:
            await broker.ensure_machine_queue(waiting.pop())

    await broker.connect()
    try:
        began = time.perf_counter()
        await asyncio.gather(*(declarer() for _ in range(at_once)))
        seconds = time.perf_counter() - began
    finally:
        await broker.close()
        admin = settings.broker_admin_url.get_secret_value()
        await delete_many(admin, vhost_of(url), queues)
        await cleanup(settings)
    return {
        "machines": count,
        "at_once": at_once,
        "queue_type": queue_type,
        "seconds": round(seconds, 2),
        "machines_per_s": round(count / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.declarations",
        description="Declare many machines' queues through the dispatcher's broker adapter and "
        "print how many machines a second (a private namespace, deleted afterwards).",
    )
    parser.add_argument("--count", type=int, default=2000, help="machines (2 queues each)")
    parser.add_argument("--at-once", type=int, default=8, help="machines declared at once")
    parser.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    args = parser.parse_args(argv)
    result = asyncio.run(declare(args.count, args.at_once, args.queue_type))
    print(json.dumps(result), flush=True)
    print(
        f"{result['machines']} machines in {result['seconds']} s: "
        f"{result['machines_per_s']} machines/s ({args.at_once} at once)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
